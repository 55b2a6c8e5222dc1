"""``hf:PATH_OR_NAME``: Hugging Face transformers models and their tokenizers.

A model is read from a local directory (``save_pretrained``'s ``config.json`` plus weights) with
``local_files_only``; ``model.kwargs.local_files_only: false`` lets transformers download a hub
name instead. The class is ``model.kwargs.hf_class`` (a transformers class name: ``AutoModel``,
``AutoModelForSequenceClassification``, ``BertModel``, ...), else the config's first
``architectures`` entry, else ``AutoModel``. The other ``model.kwargs`` update the config
(``num_labels: 3``); ``attn_implementation`` picks the attention kernel. Models load in float32.

Nothing here runs code from a model directory: ``trust_remote_code`` is refused, and so is a
config that names custom code (``auto_map``). The spec a run's manifest rebuilds from carries the
model's whole config (``model.kwargs.hf_config``), so ``compress_cli.load`` builds the architecture
from it (``from_config``) without the original directory, and loads the stored weights on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import SourceError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

#: ``model.kwargs`` of an ``hf:`` source that are not config fields
LOADER_KWARGS = ("hf_class", "hf_config", "local_files_only", "attn_implementation", "revision", "subfolder")
#: the install line named when transformers is missing
INSTALL = "pip install compress-cli[hf]"


def _transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise SourceError(f"{where}: needs the transformers package: {INSTALL}") from None
    return transformers


def _dtype_kwarg(transformers: Any) -> str:
    """``dtype`` (transformers 5) or ``torch_dtype`` (4.x): the loaders' name for the weights' type."""
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def read_config(name: str, local_only: bool, where: str) -> dict[str, Any]:
    """The ``config.json`` of the model ``name`` as a dict (from its directory; from the hub only
    when ``local_only`` is false); SourceError naming the way out otherwise."""
    d = Path(name).expanduser()
    if d.is_dir():
        path = d / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise SourceError(
                f"{where}: {path} is missing: not a Hugging Face model directory "
                "(write one with model.save_pretrained(DIR))"
            ) from None
        except (OSError, ValueError) as e:
            raise SourceError(f"{where}: {path}: unreadable config ({e})") from None
        if not isinstance(config, dict):
            raise SourceError(f"{where}: {path}: expected a JSON object")
        return config
    if local_only:
        raise SourceError(
            f"{where}: {name} is not a directory (a Hugging Face model directory holding config.json); "
            "to let transformers download it from the hub, set model.kwargs.local_files_only: false"
        )
    transformers = _transformers(where)
    try:
        cfg = transformers.AutoConfig.from_pretrained(name, local_files_only=False, trust_remote_code=False)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{where}: cannot read its config ({first})") from None
    return json.loads(cfg.to_json_string(use_diff=False))


def check_config(config: dict[str, Any], where: str) -> None:
    """Refuse a config that asks for custom code (``auto_map``) or names no ``model_type``."""
    if config.get("auto_map"):
        raise SourceError(
            f"{where}: its config names custom code (auto_map: {sorted(config['auto_map'])}), which "
            "compress never runs (no trust_remote_code); use a model whose class ships in transformers"
        )
    if not isinstance(config.get("model_type"), str):
        raise SourceError(f"{where}: its config.json has no model_type")


def model_class(transformers: Any, hf_class: Any, config: dict[str, Any], where: str) -> Any:
    """The transformers class to build: ``hf_class``, else the config's first architecture, else
    ``AutoModel``."""
    if hf_class is None:
        archs = config.get("architectures") or []
        name, key = (archs[0], "its config's architectures") if archs else ("AutoModel", "the default")
    else:
        name, key = hf_class, "model.kwargs.hf_class"
    cls = None
    if isinstance(name, str) and name.isidentifier():
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazily imported class whose own dependencies are missing
            cls = None
    ok = isinstance(cls, type) and (
        issubclass(cls, transformers.PreTrainedModel)
        or (name.startswith("AutoModel") and hasattr(cls, "from_config"))
    )
    if not ok:
        autos = [n for n in dir(transformers) if n.startswith("AutoModel")]
        raise SourceError(
            f"{where}: {key} names {name!r}, not a transformers model class{did_you_mean(str(name), autos)}; "
            "set model.kwargs.hf_class to one (AutoModel, AutoModelForSequenceClassification, ...)"
        )
    return cls


def build_hf(name: str, kwargs: dict[str, Any], weights: bool) -> nn.Module:
    """The model ``hf:name``: with ``weights`` loaded from its directory (``from_pretrained``), else
    built from its config (``model.kwargs.hf_config`` when the spec carries it, as manifests do)
    with fresh weights."""
    import torch

    where = f"model.source hf:{name}"
    transformers = _transformers(where)
    kw = dict(kwargs)
    if "trust_remote_code" in kw:
        raise SourceError(
            "model.kwargs.trust_remote_code: compress never runs code from a model directory; "
            "use a model whose class ships in transformers"
        )
    hf_class = kw.pop("hf_class", None)
    stored = kw.pop("hf_config", None)
    local_only = kw.pop("local_files_only", True)
    attn = kw.pop("attn_implementation", None)
    hub = {k: kw.pop(k) for k in ("revision", "subfolder") if k in kw}
    if not isinstance(local_only, bool):
        raise SourceError(f"model.kwargs.local_files_only: must be true or false (got {local_only!r})")
    if stored is not None and not isinstance(stored, dict):
        raise SourceError("model.kwargs.hf_config: must be a mapping (a config.json's content)")
    config_dict = stored if stored is not None and not weights else read_config(name, local_only, where)
    check_config(config_dict, where)
    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    fields.update(kw)  # the recipe's overrides, e.g. num_labels
    if attn is not None:
        fields["attn_implementation"] = attn
    try:
        config = transformers.AutoConfig.for_model(config_dict["model_type"], **fields)
    except (ValueError, TypeError, KeyError) as e:
        raise SourceError(f"{where}: bad config or model.kwargs ({e})") from None
    cls = model_class(transformers, hf_class, config_dict, where)
    load_kw: dict[str, Any] = {_dtype_kwarg(transformers): torch.float32}
    if attn is not None:
        load_kw["attn_implementation"] = attn
    try:
        if weights:
            model = cls.from_pretrained(
                str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name,
                config=config,
                local_files_only=local_only,
                trust_remote_code=False,
                **hub,
                **load_kw,
            )
        elif hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=False, **load_kw)
        else:
            model = cls._from_config(config, **load_kw)
    except SourceError:
        raise
    except Exception as e:  # missing/corrupt weights, a class that does not fit the config
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{where}: cannot build {cls.__name__} ({type(e).__name__}: {first})") from None
    return model.float()


def model_spec_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``hf_config``: the loaded model's whole config (JSON values), which a manifest
    rebuilds the architecture from without the original directory."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return dict(kwargs)
    return {**kwargs, "hf_config": json.loads(config.to_json_string(use_diff=False))}


def load_tokenizer(path: str, where: str) -> Any:
    """The tokenizer saved in the Hugging Face directory ``path`` (``AutoTokenizer``, local files
    only, no custom code)."""
    transformers = _transformers(where)
    d = Path(path).expanduser()
    if not d.is_dir():
        raise SourceError(f"{where}: {path} is not a directory (a Hugging Face tokenizer or model directory)")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(d), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SourceError(
            f"{where}: no usable tokenizer in {d} ({type(e).__name__}: {first}); save one there with "
            "tokenizer.save_pretrained(DIR), or point data.kwargs.tokenizer at one"
        ) from None


#: the files a Hugging Face tokenizer is saved as (``save_pretrained``), whichever its kind has
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def has_tokenizer(directory: Path | str) -> bool:
    """Whether ``directory`` holds a saved tokenizer (its ``tokenizer_config.json``)."""
    return (Path(directory) / "tokenizer_config.json").is_file()


def copy_tokenizer(source_dir: str | Path, directory: Path) -> list[str]:
    """Copy the tokenizer files of ``source_dir`` into the model directory ``directory`` (beside the
    manifest; the size on disk counts only the manifest and the weights), so the compressed model
    directory is deployable on its own: ``AutoTokenizer.from_pretrained(directory)`` reads them.
    Returns the names copied (none when ``source_dir`` holds no tokenizer)."""
    from compress_cli._utils.io import atomic_write_bytes

    src = Path(source_dir).expanduser()
    if not has_tokenizer(src):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file() and f.resolve() != (directory / name).resolve():
            atomic_write_bytes(directory / name, f.read_bytes())
            copied.append(name)
    return copied


def tokenizer_dir(model_source: str | None) -> str | None:
    """The directory a model's tokenizer is read from by default: ``PATH`` of ``hf:PATH``; for a
    compressed model directory, the directory itself when the tokenizer was saved into it, else its
    manifest's source; None for other sources (text data then needs ``data.kwargs.tokenizer``)."""
    from compress_cli.sources.spec import parse_model_source

    if not model_source:
        return None
    try:
        parsed = parse_model_source(model_source)
        if parsed.kind == "directory":
            if has_tokenizer(parsed.name):
                return parsed.name
            from compress_cli.checkpoint import read_manifest

            parsed = parse_model_source(read_manifest(model_source)["model"]["source"])
    except (ValueError, SourceError):
        return None
    return parsed.name if parsed.kind == "hf" else None
