"""Typed errors. Each carries the exit code the CLI returns and a one-line message that says what to fix."""


class KilnError(Exception):
    """Anything kiln did not expect (exit 3)."""

    exit_code = 3

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class BadInput(KilnError):
    """The user's input is wrong: recipe, model URI, model or data file (exit 2)."""

    exit_code = 2


class RecipeError(BadInput):
    """A recipe field is missing, unknown or invalid; the message names the field path."""


class SourceError(BadInput):
    """The model URI or tracking URI cannot be resolved; the message names the URI."""


class ModelError(BadInput):
    """The model itself cannot be loaded, exported or run as the recipe describes."""


class DataError(BadInput):
    """The validation data is wrong (unreadable file, wrong dtype, NaN, no samples); the message names the file,
    tensor and sample. Not the model's fault: no gate is judged on such data."""


class GateFailed(KilnError):
    """A parity or latency gate failed (exit 1). Nothing is published."""

    exit_code = 1


class StageCrashed(KilnError):
    """A stage raised something unexpected; the message names the stage and the step key."""


class Unschedulable(KilnError):
    """No worker of the cluster offers the resources a step needs (e.g. a GPU target on CPU-only nodes)."""

    status = "unschedulable"


def first_line(exc: BaseException, limit: int | None = 300, empty: str = "") -> str:
    """The first line of an exception's message (surrounding whitespace dropped), at most `limit` characters (None: all);
    `empty` when the message has no text. For one-line error messages that quote what a library said."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else empty)[:limit]
