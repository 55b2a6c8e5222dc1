"""Recipe: YAML (with line numbers) -> validated pydantic ``Recipe``.

Validation runs in two passes (top level, then each stage through its own config model) and
collects every problem before failing; each problem is one line ``FILE:LINE: path: rule (got v)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress_cli.errors import RecipeError
from compress_cli.stages.base import StageConfig

AUTO = "auto"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(
        description="zoo:NAME | torchvision:NAME | package.module:callable | path to a compressed model dir"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor keyword arguments")
    checkpoint: str | None = Field(
        None, description=".pt/.pth state_dict, .safetensors, or a compressed model dir"
    )
    input_shape: list[int] | None = Field(
        None, description="one sample's shape, e.g. [1, 28, 28] (default: the data's)"
    )
    allow_pickle: bool = Field(
        False, description="allow a fully pickled module checkpoint (runs code: trust it)"
    )
    trust_source: bool = Field(
        False,
        exclude=True,  # a decision of whoever runs: not copied into recipe.yaml, manifests, digests
        description="let a compressed model directory (source, checkpoint, snapshots) name a "
        "package.module:callable source, i.e. run code it names (trust it)",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from compress_cli.sources.spec import check_model_source

        problem = check_model_source(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d <= 0 for d in v)):
            raise ValueError("must be a non-empty list of positive sizes")
        return v


class DataConfig(_Strict):
    source: str = Field(
        "digits",
        description="digits | mnist | fashion_mnist | torchvision:NAME | imagefolder | synthetic | package.module:callable",
    )
    root: str | None = Field(None, description="folder holding the dataset files")
    download: bool = Field(False, description="let torchvision datasets download (needs internet)")
    batch_size: int = Field(64, gt=0, description="training batch size")
    eval_batch_size: int = Field(256, gt=0, description="batch size for evaluation")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the training data held out for validation"
    )
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="held-out test share for sources without a test split"
    )
    calibration_batches: int = Field(8, gt=0, description="training batches kept for calibration/importance")
    limit_train: int | None = Field(None, gt=0, description="use at most this many training samples")
    limit_test: int | None = Field(None, gt=0, description="use at most this many test samples")
    input_shape: list[int] | None = Field(None, description="synthetic: one sample's shape")
    num_classes: int | None = Field(None, gt=1, description="synthetic: number of classes")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the source")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from compress_cli.sources.data import check_source

        problem = check_source(v)
        if problem:
            raise ValueError(problem)
        return v


class LatencyConfig(_Strict):
    batch_sizes: list[int] = Field(
        [1, 64], min_length=1, description="first: latency batch; last: throughput batch"
    )
    warmup: int = Field(5, ge=0)
    iterations: int = Field(20, gt=0)
    threads: int | None = Field(None, gt=0, description="CPU threads (default: torch's current setting)")


class MeasureConfig(_Strict):
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig, description="null disables latency")
    macs: bool = True
    split: Literal["test", "val"] = "test"


class GuardConfig(_Strict):
    max_accuracy_drop: float | None = Field(None, ge=0, description="points of top-1 against the baseline")
    max_latency_ms: float | None = Field(None, gt=0)
    max_size_bytes: int | None = Field(None, gt=0)
    min_speedup: float | None = Field(None, gt=0, description="baseline latency / current latency")
    on_violation: Literal["fail", "revert", "warn"] = "fail"


class Recipe(_Strict):
    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    deterministic: bool = Field(False, description="use deterministic algorithms (slower)")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    time_budget_s: float | None = Field(None, gt=0, description="stop cleanly after this many seconds")
    stages: list[StageConfig] = Field(default_factory=list)
    output: str | None = Field(None, description="output directory (default runs/NAME)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_yaml_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- YAML with lines
class _LineLoader(yaml.SafeLoader):
    pass


def _lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[(*path, key)] = k.start_mark.line + 1
            _lines(v, (*path, key), out)
            out[(*path, key)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*path, i), out)


class RawRecipe:
    """The parsed YAML plus a map from key path to line number."""

    def __init__(self, data: Any, lines: dict[tuple[Any, ...], int], filename: str):
        self.data = data
        self.lines = lines
        self.filename = filename
        self.overridden: dict[tuple[Any, ...], str] = {}

    def where(self, path: tuple[Any, ...]) -> str:
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in self.overridden:
                return f"--set {self.overridden[tuple(path[:n])]}"
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.filename}:{line}" if line else self.filename


def parse_yaml(text: str, filename: str = "<recipe>") -> RawRecipe:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        ctx = ""
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            ctx = f" ({e.context.replace('while parsing', 'in')} started at line {e.context_mark.line + 1})"
        raise RecipeError(f"{filename}{line}: YAML syntax error: {e.problem or e}{ctx}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{filename}: YAML error: {e}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _lines(node, (), lines)
    return RawRecipe(data, lines, filename)


def read_recipe_file(path: str | Path) -> RawRecipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a directory, expected a recipe YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read recipe: {e}") from None
    return parse_yaml(text, str(p))


# --------------------------------------------------------------------------- --set overrides
def apply_overrides(raw: RawRecipe, overrides: list[str]) -> None:
    """``key.path=value``: value parsed as YAML; list indices are numbers. Creates missing keys."""
    if overrides and not isinstance(raw.data, dict):
        raw.data = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected key.path=value")
        key, _, text = item.partition("=")
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        if not all(str(p) for p in parts):
            raise RecipeError(f"--set {item}: empty key in path")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node: Any = raw.data
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                if isinstance(node, dict):
                    node[part] = [] if isinstance(nxt, int) else {}
                    node = node[part]
                else:
                    raise RecipeError(
                        f"--set {item}: no element {'.'.join(map(str, parts[: depth + 1]))}"
                    ) from None
        last = parts[-1]
        try:
            if isinstance(node, list) and isinstance(last, int) and last == len(node):
                node.append(value)
            else:
                node[last] = value
        except (IndexError, TypeError):
            raise RecipeError(f"--set {item}: no element {key}") from None
        raw.overridden[tuple(parts)] = item


# --------------------------------------------------------------------------- validation
def _fmt_value(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _fmt_path(path: tuple[Any, ...], stage_types: dict[int, str]) -> str:
    out = ""
    for i, p in enumerate(path):
        if isinstance(p, int):
            out += f"[{p}]"
            if i == 1 and path[0] == "stages" and p in stage_types:
                out += f" ({stage_types[p]})"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def _pydantic_problems(
    err: ValidationError,
    raw: RawRecipe,
    prefix: tuple[Any, ...],
    model: type[BaseModel],
    stage_types: dict[int, str],
) -> list[str]:
    problems = []
    merged: dict[str, list[str]] = {}  # union branches: one line per path, alternatives joined
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and _UNION_BRANCH.match(x)))
        path = prefix + loc
        kind = e["type"]
        if kind == "extra_forbidden" and loc:
            fields = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
            rule = "unknown key" + (
                f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(fields)})"
            )
            problems.append(f"{raw.where(path)}: {_fmt_path(path, stage_types)}: {rule}")
            continue
        if kind == "missing":
            problems.append(f"{raw.where(path)}: {_fmt_path(path, stage_types)}: required key is missing")
            continue
        msg = e["msg"]
        if kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"must be one of {allowed.replace(' or ', ', ')}"
        else:
            msg = re.sub(
                r"\b(Input|List|String|Dictionary|Tuple|Set) should ",
                "must ",
                msg.replace("Value error, ", ""),
            )
        line = f"{raw.where(path)}: {_fmt_path(path, stage_types)}: "
        if line in merged:
            merged[line].append(msg.replace("must be ", "", 1))
            continue
        merged[line] = [msg, f" (got {_fmt_value(e.get('input'))})"]
        problems.append(line)
    return [
        p + " or ".join(merged[p][:1] + merged[p][2:]) + merged[p][1] if p in merged else p for p in problems
    ]


_UNION_BRANCH = re.compile(
    r"^(function-.*|float|int|str|bool|none|dict\[.*\]|list\[.*\]|literal\[.*\]|[A-Z]\w*Config)$"
)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    m: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        f = getattr(m, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        cand = [
            a
            for a in (ann, *getattr(ann, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not cand:
            return []
        m = cand[0]
    return list(getattr(m, "model_fields", {}))


def validate(raw: RawRecipe) -> Recipe:
    """Both passes plus the cross-stage rules; raises RecipeError listing every problem."""
    from compress_cli.errors import did_you_mean
    from compress_cli.stages.registry import get_stage, list_stages

    data = raw.data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{raw.filename}:1: the recipe must be a mapping of keys (got {type(data).__name__})"
        )
    problems: list[str] = []
    stages_raw = data.get("stages", [])
    stage_types: dict[int, str] = {}
    stage_cfgs: list[StageConfig] = []
    if not isinstance(stages_raw, list):
        problems.append(
            f"{raw.where(('stages',))}: stages: must be a list of stages (got {_fmt_value(stages_raw)})"
        )
        stages_raw = []
    known = list_stages()
    for i, item in enumerate(stages_raw):
        path = ("stages", i)
        if not isinstance(item, dict):
            problems.append(
                f"{raw.where(path)}: stages[{i}]: must be a mapping with a 'type' key (got {_fmt_value(item)})"
            )
            continue
        t = item.get("type")
        if not isinstance(t, str):
            problems.append(
                f"{raw.where(path)}: stages[{i}].type: required key is missing (one of {', '.join(known)})"
            )
            continue
        if t not in known:
            problems.append(
                f"{raw.where((*path, 'type'))}: stages[{i}].type: unknown stage type {t!r}{did_you_mean(t, known)}"
            )
            continue
        stage_types[i] = t
        cls = get_stage(t)
        try:
            stage_cfgs.append(cls.config_class.model_validate(item))
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, raw, path, cls.config_class, stage_types))
    top = {k: v for k, v in data.items() if k != "stages"}
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(top)
    except ValidationError as e:
        problems = _pydantic_problems(e, raw, (), Recipe, stage_types) + problems
    if recipe is not None and not problems:
        recipe = recipe.model_copy(update={"stages": stage_cfgs})
        problems.extend(cross_stage_rules(recipe, raw))
    if problems:
        raise RecipeError(problems)
    assert recipe is not None
    return recipe


def cross_stage_rules(recipe: Recipe, raw: RawRecipe | None = None) -> list[str]:
    """Every rule that spans stages or needs the device, in one place."""
    where = raw.where if raw else (lambda p: "<recipe>")
    problems: list[str] = []
    _stage_list_rules(recipe.stages, ("stages",), "", where, recipe.device, set(), [None], [], problems)
    return problems


def _stage_list_rules(
    stages: list[StageConfig],
    path: tuple[Any, ...],
    prefix: str,
    where: Any,
    device: str,
    provided: set[str],
    frozen: list[str | None],
    earlier: list[StageConfig],
    problems: list[str],
) -> None:
    """The rules over one list of stages; nested lists (``Stage.children``) are checked in place."""
    from compress_cli.stages.registry import get_stage, list_stages

    findable = set().union(*(get_stage(t).provides for t in list_stages()))  # what 'auto' can stand for
    for i, cfg in enumerate(stages):
        cls = get_stage(cfg.type)
        label = f"{prefix}stages[{i}] ({cfg.type})"
        for key, value in cfg.model_dump().items():
            if value == AUTO and key in findable and key not in provided:
                finder = {"lr": "lr_find", "batch_size": "batch_size_find"}.get(key, "a stage that finds it")
                problems.append(
                    f"{where((*path, i, key))}: {label}.{key}: 'auto' needs {finder} earlier in the recipe"
                )
        if frozen[0] is not None and cls.modifies(cfg):
            what = "train" if cls.trains(cfg) else "change the model"
            problems.append(
                f"{where((*path, i))}: {label}: cannot {what} after {frozen[0]} converted the model for "
                "inference (move this stage before it; for training with quantization use scheme: qat)"
            )
        for msg in cls.check(cfg, device, tuple(earlier)):
            problems.append(f"{where((*path, i))}: {label}: {msg}")
        for field_name, nested in cls.children(cfg):
            _stage_list_rules(
                nested,
                (*path, i, field_name),
                f"{label}.",
                where,
                device,
                provided,
                frozen,
                earlier,
                problems,
            )
        earlier.append(cfg)
        provided |= cls.provides
        if cls.freezes(cfg):
            frozen[0] = label


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, RawRecipe]:
    raw = read_recipe_file(path)
    apply_overrides(raw, overrides or [])
    return validate(raw), raw


def recipe_to_yaml(recipe: Recipe, filled: dict[str, Any] | None = None) -> str:
    """The recipe as run (``filled`` maps 'stages.N.key' to the value an ``auto`` resolved to)."""
    d = copy.deepcopy(recipe.to_yaml_dict())
    d["stages"] = [s.model_dump(mode="json", exclude_none=True) for s in recipe.stages]
    for k, v in (filled or {}).items():
        parts = [int(p) if p.isdigit() else p for p in k.split(".")]
        node: Any = d
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return yaml.safe_dump(d, sort_keys=False)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe format, with each stage's config under a oneOf on ``type``."""
    from compress_cli.stages.registry import get_stage, list_stages

    schema = Recipe.model_json_schema()
    variants = []
    defs = schema.setdefault("$defs", {})
    for name in list_stages():
        sub = get_stage(name).config_class.model_json_schema(ref_template="#/$defs/{model}")
        for k, v in sub.pop("$defs", {}).items():
            defs[k] = v
        sub["properties"]["type"] = {"const": name, "description": "stage type"}
        sub["required"] = sorted(set(sub.get("required", [])) | {"type"})
        sub["title"] = f"stage {name}"
        variants.append(sub)
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": variants}}
    defs.pop("StageConfig", None)
    return schema
