"""The recipe: one YAML file per model, declared as pydantic models. Unknown keys are errors.

Each section is defined where it is used: a stage's options with that stage (gates in stages/gate.py, variants in
stages/quantize.py and stages/olive.py, tuning in stages/tune.py, ...), a serving target's with its target module,
a source framework's export options with that framework. This module assembles them through the registry and adds
what only the recipe knows: where the source is, and the checks across sections.

`kiln schema` prints the JSON Schema of `Recipe`; `kiln validate` reports every problem with its field path.
Relative paths inside a recipe are resolved against the recipe file's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline import registry
from pipeline.errors import RecipeError
from pipeline.schema import Slug, Strict, has_control

# No control characters in a name: it is written into serving configs and READMEs (a newline would start a line).
MODEL_URI = re.compile(r"models:/(?P<name>[^/@\x00-\x1f\x7f]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>[0-9]+|latest))")


class Source(Strict):
    uri: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; overrides MLFLOW_TRACKING_URI")
    signature: str = Field("serving_default", description="TensorFlow SavedModels: the signature to convert and call")
    # exclude: trust is not content; it stays out of the recipe's digest and every step key and manifest.
    allow_pickle: bool = Field(False, exclude=True, description="Trust this model: load it even in formats that "
                               "run code when loaded (pickle, cloudpickle, MLflow code_paths); see also "
                               "<artifacts>/trust.yaml")

    @field_validator("uri")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        if not MODEL_URI.fullmatch(value):
            raise ValueError(f"{value!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
        return value



# The sections stages define (see each module for its fields).
TensorDecl = registry.section("data", "TensorDecl")
Data = registry.section("data", "Data")
Export = registry.section("export", "Options")
Optimize = registry.section("optimize", "Config")
Latency = registry.section("validate", "Latency")
Localize = registry.section("validate", "Localize")
Gates = registry.section("gate", "Gates")
ParityGates = registry.section("gate", "ParityGates")
Tune = registry.section("tune", "Tune")
WriteBack = registry.section("register", "WriteBack")
Variant = registry.variant_model()
Serving = registry.serving_model()
VARIANT_FIELDS = registry.variant_kinds()


class Validation(Strict):
    data: Data = Field(default_factory=Data)
    latency: Latency = Field(default_factory=Latency)
    shape_sweep: bool = Field(True, description="Also compare at size 1 and half size of every dynamic axis")
    localize: Localize = Field(default_factory=Localize)


class Publish(Strict):
    dest: str | None = Field(None, description="Folder for bundles; default: <artifacts>/bundles. A relative path "
                             "must stay inside the artifacts folder; anywhere else needs an absolute path")
    write_back: WriteBack = Field(default_factory=WriteBack)  # type: ignore[valid-type]

    @field_validator("dest")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        # The bundle's path is written into serving configs (config.properties, models.config), one value a line.
        if value is not None and (not value.strip() or has_control(value)):
            raise ValueError("empty, or control characters (a newline?) in the path")
        return value


class Recipe(Strict):
    name: Slug
    source: Source
    inputs: list[TensorDecl] | None = Field(None, description="Needed when the MLflow signature does not say")
    outputs: list[str] | None = Field(None, description="Output names when the MLflow signature does not say")
    export: Export = Field(default_factory=Export)
    optimize: Optimize = Field(default_factory=Optimize)
    validation: Validation = Field(default_factory=Validation)
    gates: Gates = Field(default_factory=Gates)
    variants: list[Variant] = Field(default_factory=list, description="Precision variants besides fp32")
    select: str = Field("fp32", description="What the bundle publishes: fp32, a variant name, or tuned (the tuned "
                        "winner of tune.publish)")
    tune: Tune | None = Field(None, description="Hardware-targeted tuning; winners go to the bundle's targets/")
    serving: Serving = Field(default_factory=Serving)
    publish: Publish = Field(default_factory=Publish)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        measured = set(self.validation.latency.batch_sizes)
        for field in ("max_p95_ms", "min_speedup"):
            value = getattr(self.gates.latency, field)
            if isinstance(value, dict):
                for batch in value:
                    if batch not in measured:
                        raise ValueError(
                            f"gates.latency.{field}: batch size {batch} is not in validation.latency.batch_sizes"
                        )
        if self.gates.parity.max_accuracy_drop is not None and not self.validation.data.labels:
            raise ValueError("gates.parity.max_accuracy_drop needs validation.data.labels")
        variant_names = [v.name for v in self.variants]
        if {"fp32", "tuned"} & set(variant_names) or len(set(variant_names)) != len(variant_names):
            raise ValueError("variants: names must be unique and not 'fp32' (the optimized model) or 'tuned'")
        for variant in self.variants:  # checks a variant's own stage makes with the recipe (e.g. Olive pass names)
            for problem in variant.problems() if hasattr(variant, "problems") else []:
                raise ValueError(f"variants.{variant.name}.{problem}")
        if self.select == "tuned":
            if self.tune is None:
                raise ValueError("select: tuned needs a `tune` section")
        elif self.select != "fp32" and self.select not in variant_names:
            raise ValueError(f"select: {self.select!r} is neither fp32, tuned nor a variant "
                             f"({', '.join(variant_names) or 'none'})")
        if self.tune:
            names = variant_names + [v.name for v in self.tune.space.precisions]
            if "fp32" in names or "tuned" in names or len(set(names)) != len(names):
                raise ValueError("tune.space.precisions: names must be unique across variants and not fp32/tuned")
        if self.inputs:
            names = [t.name for t in self.inputs]
            if len(set(names)) != len(names):
                raise ValueError("inputs: tensor names must be unique")
        return self


def json_schema() -> dict:
    """The recipe's JSON Schema (`kiln schema`). Sections defined as a module's `Config` are listed under their
    titles (TritonTarget, Optimize, ...), not pydantic's module-qualified names."""
    schema = Recipe.model_json_schema()
    titles = [d.get("title") for d in schema["$defs"].values()]
    renamed = {old: d["title"] for old, d in schema["$defs"].items()
               if d.get("title") not in (None, old) and titles.count(d["title"]) == 1 and d["title"] not in schema["$defs"]}
    text = json.dumps(schema)
    for old, new in renamed.items():
        text = text.replace(f'"#/$defs/{old}"', f'"#/$defs/{new}"')
    schema = json.loads(text)
    schema["$defs"] = {renamed.get(k, k): v for k, v in schema["$defs"].items()}
    return schema


def _field_path(error: dict) -> str:
    # A variant's kind appears in the location as the union's tag (variants.0.int8-dynamic.per_channel): leave it out.
    parts = [str(p) for p in error["loc"] if not str(p).startswith("function-after") and p not in VARIANT_FIELDS]
    # A key is the user's text: one with a newline or other control character is shown quoted, on one line.
    return ".".join(part if part.isprintable() else repr(part) for part in parts) or "(recipe)"


def _unknown_key(error: dict, path: str) -> str:
    kind = next((p for p in error["loc"] if p in VARIANT_FIELDS), None)
    field = str(error["loc"][-1])
    owners = [k for k, fields in VARIANT_FIELDS.items() if field in fields]
    if kind and owners:
        return f"{path}: only kind {' / '.join(owners)} takes {field!r} (this variant is {kind})"
    return f"{path}: unknown key (check the spelling; `kiln schema` lists the fields)"


def validation_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        path = _field_path(item)
        if item["type"] == "extra_forbidden":
            problems.append(_unknown_key(item, path))
        elif item["type"] == "missing":
            problems.append(f"{path}: required field is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            # A section's cross-field check names its field first ("publish: ..."): join it to the path.
            field = re.match(r"^([a-z_][\w.\-\[\]]*): ", message)
            if field:
                path = field[1] if path == "(recipe)" else f"{path}.{field[1]}"
                message = message[field.end():]
            problems.append(f"{path}: {message}")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently, so a
    second `gates:` would drop the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def recipe_problems(path: Path) -> tuple[Recipe | None, list[str]]:
    """Parse and validate a recipe; return it with no problems, or None with every problem found."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return None, [f"cannot read recipe: {exc.strerror}"]
    except UnicodeDecodeError as exc:
        return None, [f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"]
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        return None, ["nested too deeply to be a recipe"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, even ReaderError's two
        return None, [f"not valid YAML{where}: {what}"]
    if not isinstance(data, dict):
        return None, ["a recipe is a YAML mapping with at least 'name' and 'source'"]
    try:
        return Recipe.model_validate(data), []
    except ValidationError as exc:
        return None, validation_problems(exc)
    except RecursionError:  # a self-referencing YAML alias
        return None, ["nested too deeply (or refers to itself) to be a recipe"]


def load_recipe(path: Path) -> Recipe:
    recipe, problems = recipe_problems(path)
    if recipe is None:
        more = f" (and {len(problems) - 1} more; run `kiln validate {path}`)" if len(problems) > 1 else ""
        raise RecipeError(f"recipe {path}: {problems[0]}{more}")
    return recipe


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a models:/ URI that the schema already accepted."""
    match = MODEL_URI.fullmatch(uri)
    assert match, uri
    return match["name"], match["alias"], match["version"]
