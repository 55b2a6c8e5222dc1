"""Text data, tokenised with the model's own tokenizer: ``text`` (CSV/TSV, JSONL/JSON, TXT files)
and ``hf_datasets`` (Hugging Face ``datasets`` from local files or a ``save_to_disk`` folder).

Where the files are (``data.kwargs``, paths relative to ``data.root``):

- ``train`` / ``val`` / ``test``: one file (or a list) per split; without ``test`` a stratified
  ``data.test_fraction`` of the training rows is held out (``val`` is carved like every source's);
- ``files``: one pool of files, split the same way;
- neither: ``data.root`` itself, a file, or a folder holding ``train.*`` (+ ``val.*``, ``test.*``)
  or else every ``.csv``/``.tsv``/``.jsonl``/``.json``/``.txt`` file in it.

Rows: ``text_key`` (default ``text``) is the text; ``text_pair_key`` an optional second text
(sentence pairs); ``label_key`` the label (default ``label`` when the rows have it; ``null`` or
absent: unlabelled data, which tasks that need labels refuse). Integer labels are class indices;
strings are mapped to 0..K-1 in sorted order (the datasets' ``classes`` lists the names); other
numbers stay floats (regression). A ``.txt`` file is one text per non-empty line, unlabelled.

Tokenisation: ``AutoTokenizer`` from ``data.kwargs.tokenizer`` (a directory), by default the
model's ``hf:`` directory (the engine passes ``model.source``); every text is truncated and
padded to exactly ``max_length`` tokens (default 128), so every batch has the same sequence length
(the padded length latency is measured at). Batches are dicts: ``input_ids``, ``attention_mask``
(and ``token_type_ids`` when the tokenizer makes them), plus ``labels`` for labelled data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_cli.errors import SourceError
from compress_cli.sources.data.registry import register_source
from compress_cli.sources.data.splits import TEST, dataset_bundle, stratified_take, stream_rng

if TYPE_CHECKING:
    import torch

    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data.bundle import DataBundle

#: the file types ``text`` reads, by extension
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")
#: ``data.kwargs`` both text sources take
TEXT_KWARGS = (
    "train",
    "val",
    "test",
    "files",
    "text_key",
    "text_pair_key",
    "label_key",
    "max_length",
    "tokenizer",
)
#: tokens every text is padded or truncated to, unless ``data.kwargs.max_length`` says
DEFAULT_MAX_LENGTH = 128
_SPLITS = ("train", "val", "test")

#: rows of one split: texts, optional second texts, labels (None: unlabelled)
Rows = tuple[list[str], list[str] | None, list[Any] | None]


class TextDataset:
    """Tokenised texts as a map-style dataset of dicts (``input_ids``, ``attention_mask``, ...,
    ``labels`` when labelled); ``labels`` is also an attribute so splits read it without loading."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: torch.Tensor | None):
        self.encoded = encoded
        self.labels = labels
        #: the label names of string labels, index = class (``data.num_classes`` is their count)
        self.classes: list[str] | None = None
        self._n = int(next(iter(encoded.values())).shape[0])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.encoded.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The rows at ``idx`` (copied)."""
        import torch

        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return TextDataset(
            {k: v[t] for k, v in self.encoded.items()}, None if self.labels is None else self.labels[t]
        )


def _options(cfg: DataConfig, source: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    kw = dict(cfg.kwargs)
    unknown = sorted(set(kw) - set(TEXT_KWARGS) - set(extra))
    if unknown:
        raise SourceError(
            f"{source}: unknown data.kwargs {unknown} (allowed: {', '.join((*TEXT_KWARGS, *extra))})"
        )
    for key in ("text_key", "text_pair_key", "label_key", "tokenizer"):
        if kw.get(key) is not None and not isinstance(kw[key], str):
            raise SourceError(f"{source}: data.kwargs.{key} must be a string (got {kw[key]!r})")
    length = kw.get("max_length", DEFAULT_MAX_LENGTH)
    if type(length) is not int or not 2 <= length <= 1 << 16:
        raise SourceError(
            f"{source}: data.kwargs.max_length must be an integer from 2 to 65536 (got {length!r})"
        )
    return kw


def _paths(value: Any, root: Path | None, source: str, key: str) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise SourceError(f"{source}: data.kwargs.{key} must be a path or a list of paths (got {value!r})")
    out = []
    for v in items:
        p = Path(v).expanduser()
        if root is not None and not p.is_absolute():
            p = root / p
        if not p.is_file():
            raise SourceError(f"{source}: data.kwargs.{key}: {p} does not exist or is not a file")
        out.append(p)
    return out


def split_files(
    cfg: DataConfig, kw: dict[str, Any], source: str, suffixes: Sequence[str]
) -> dict[str, list[Path]]:
    """The files of each split (``pool`` when the test split is carved from them); see the module
    docstring for where they are looked for."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    named = {k: kw[k] for k in (*_SPLITS, "files") if kw.get(k) is not None}
    if "files" in named and set(named) & set(_SPLITS):
        raise SourceError(f"{source}: data.kwargs.files or train/val/test, not both")
    if named:
        if "files" in named:
            return {"pool": _paths(named["files"], root, source, "files")}
        if "train" not in named:
            raise SourceError(f"{source}: data.kwargs.train is needed with val/test (the training files)")
        files = {k: _paths(v, root, source, k) for k, v in named.items()}
        if "test" not in files:
            files["pool"] = files.pop("train")
        return files
    if root is None:
        raise SourceError(
            f"{source}: no files: set data.root (a file or a folder of {'/'.join(suffixes)} files) "
            "or data.kwargs.train / data.kwargs.files"
        )
    if root.is_file():
        return {"pool": [root]}
    if not root.is_dir():
        raise SourceError(f"{source}: data.root {root} does not exist")
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    by_split = {s: [p for p in found if p.stem == s] for s in (*_SPLITS, "validation")}
    by_split["val"] += by_split.pop("validation")
    if by_split["train"]:
        files = {k: v for k, v in by_split.items() if v}
        if "test" not in files:
            files["pool"] = files.pop("train")
        return files
    if not found:
        raise SourceError(f"{source}: data.root {root} holds no {', '.join(suffixes)} files")
    return {"pool": found}


def read_rows(path: Path, source: str) -> list[dict[str, Any]] | list[str]:
    """The records of one file: dicts for CSV/TSV/JSONL/JSON, lines (str) for TXT."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{source}: cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{source}: {path}: not JSON lines ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"{source}: {path}: expected one JSON object per line (or a list of objects)")
    return rows


def columns(records: list[dict[str, Any]] | list[str], kw: dict[str, Any], source: str, where: str) -> Rows:
    """(texts, second texts, labels) of some records; SourceError naming a missing column."""
    text_key = kw.get("text_key") or "text"
    pair_key = kw.get("text_pair_key")
    if records and isinstance(records[0], str):
        if kw.get("label_key"):
            raise SourceError(f"{source}: {where}: a .txt file has no columns, so no label_key")
        if pair_key:
            raise SourceError(f"{source}: {where}: a .txt file has no columns, so no text_pair_key")
        return [str(r) for r in records], None, None
    rows: list[dict[str, Any]] = records  # type: ignore[assignment]
    keys = list(rows[0]) if rows else []
    label_key = kw.get("label_key", "label" if "label" in keys else None)
    for key, name in ((text_key, "text_key"), (pair_key, "text_pair_key"), (label_key, "label_key")):
        if key is None:
            continue
        for i, r in enumerate(rows):
            if r.get(key) is None or r.get(key) == "":
                missing = "has no column" if key not in r else "has an empty value in column"
                raise SourceError(
                    f"{source}: {where} row {i + 1} {missing} {key!r} (data.kwargs.{name}; "
                    f"columns: {', '.join(map(str, r))})"
                )
    texts = [str(r[text_key]) for r in rows]
    pairs = [str(r[pair_key]) for r in rows] if pair_key else None
    labels = [r[label_key] for r in rows] if label_key else None
    return texts, pairs, labels


def label_tensor(labels: dict[str, list[Any]]) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Every split's labels as tensors: integers (or integer strings) as class indices, other
    numbers as floats, anything else mapped to ``0..K-1`` by sorted name (the names returned)."""
    import torch

    every = [v for vals in labels.values() for v in vals]

    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    def as_float(v: Any) -> float | None:
        if isinstance(v, bool):
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    if all(as_int(v) is not None for v in every):
        return {
            k: torch.tensor([as_int(v) for v in vals], dtype=torch.long) for k, vals in labels.items()
        }, None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in every) or (
        all(isinstance(v, str) for v in every) and all(as_float(v) is not None for v in every)
    ):
        return {
            k: torch.tensor([float(v) for v in vals], dtype=torch.float32) for k, vals in labels.items()
        }, None
    names = sorted({str(v) for v in every})
    index = {n: i for i, n in enumerate(names)}
    return {
        k: torch.tensor([index[str(v)] for v in vals], dtype=torch.long) for k, vals in labels.items()
    }, names


def tokenizer_for(cfg: DataConfig, kw: dict[str, Any], source: str) -> Any:
    """The tokenizer of ``data.kwargs.tokenizer`` (filled in from the model's ``hf:`` directory by
    ``build_data`` when unset)."""
    from compress_cli.sources.hf import load_tokenizer

    path = kw.get("tokenizer")
    if not path:
        raise SourceError(
            f"{source}: needs a tokenizer: set data.kwargs.tokenizer to a Hugging Face tokenizer (or model) "
            "directory, or use a model.source hf:DIR that holds one"
        )
    return load_tokenizer(path, f"{source}: data.kwargs.tokenizer")


def text_bundle(
    cfg: DataConfig, seed: int, source: str, splits: dict[str, Rows], kw: dict[str, Any]
) -> DataBundle:
    """Tokenise the rows of each split (``pool``: the test split is carved from it) and split them
    into a :class:`DataBundle` of dict batches."""
    import torch

    labelled = {k: v[2] is not None for k, v in splits.items()}
    if len(set(labelled.values())) > 1:
        raise SourceError(
            f"{source}: some splits have labels and some do not ({labelled}); set data.kwargs.label_key "
            "for all, or label_key: null for unlabelled data"
        )
    for name, (texts, _, _) in splits.items():
        if not texts:
            raise SourceError(f"{source}: the {name} files hold no rows")
    tokenizer = tokenizer_for(cfg, kw, source)
    length = int(kw.get("max_length", DEFAULT_MAX_LENGTH))
    names: list[str] | None = None
    labels: dict[str, torch.Tensor | None] = dict.fromkeys(splits)
    if all(labelled.values()):
        tensors, names = label_tensor({k: v[2] for k, v in splits.items() if v[2] is not None})
        labels.update(tensors)
    data: dict[str, TextDataset] = {}
    for name, (texts, pairs, _) in splits.items():
        try:
            enc = tokenizer(
                texts,
                pairs,
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
        except Exception as e:
            raise SourceError(
                f"{source}: the tokenizer failed on the {name} texts ({type(e).__name__}: {e})"
            ) from None
        keep = ("input_ids", "attention_mask", "token_type_ids")
        data[name] = TextDataset({k: enc[k] for k in keep if k in enc}, labels[name])
    if "pool" in data:
        pool = data.pop("pool")
        y = pool.labels
        strat = y.numpy() if y is not None and y.dtype == torch.long else np.zeros(len(pool), dtype=np.int64)
        test_idx, rest = stratified_take(
            strat, math.ceil(cfg.test_fraction * len(pool)), stream_rng(seed, TEST)
        )
        data["test"], data["train"] = pool.subset(test_idx), pool.subset(rest)
    if names is not None:
        for ds in data.values():
            ds.classes = names
    return dataset_bundle(cfg, seed, source, data["train"], data.get("val"), data["test"])


@register_source("text", tokenizer=True)
def build_text(cfg: DataConfig, seed: int, _argument: str, _shape: list[int] | None) -> DataBundle:
    """CSV/TSV/JSONL/JSON/TXT files of text (see the module docstring), tokenised to dict batches."""
    source = "text"
    kw = _options(cfg, source)
    rows: dict[str, Rows] = {}
    for split, paths in split_files(cfg, kw, source, TEXT_SUFFIXES).items():
        parts = [columns(read_rows(p, source), kw, source, str(p)) for p in paths]
        rows[split] = _concat(parts, source, split)
    return text_bundle(cfg, seed, source, rows, kw)


def _concat(parts: list[Rows], source: str, split: str) -> Rows:
    if len({p[2] is None for p in parts}) > 1 or len({p[1] is None for p in parts}) > 1:
        raise SourceError(f"{source}: the {split} files differ in having labels or text pairs")
    texts = [t for p in parts for t in p[0]]
    pairs = None if parts[0][1] is None else [t for p in parts for t in p[1] or []]
    labels = None if parts[0][2] is None else [v for p in parts for v in p[2] or []]
    return texts, pairs, labels


#: ``datasets.load_dataset`` builders by file extension
_DATASET_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text"}


@register_source("hf_datasets", tokenizer=True)
def build_hf_datasets(cfg: DataConfig, seed: int, _argument: str, _shape: list[int] | None) -> DataBundle:
    """Hugging Face ``datasets`` from local files (``datasets.load_dataset(format, data_files=...)``,
    format from ``data.kwargs.format`` or the extension) or a ``save_to_disk`` folder
    (``data.root`` holding ``dataset_dict.json`` or ``dataset_info.json``: ``load_from_disk``; its
    ``train``/``validation``/``test`` splits are used). Never downloads. Tokenised like ``text``."""
    source = "hf_datasets"
    kw = _options(cfg, source, extra=("format",))
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{source}: needs the datasets package: pip install compress-cli[hf]") from None
    fmt = kw.get("format")
    if fmt is not None and fmt not in ("csv", "json", "text"):
        raise SourceError(f"{source}: data.kwargs.format must be csv, json or text (got {fmt!r})")
    root = Path(cfg.root).expanduser() if cfg.root else None
    saved = (
        root is not None
        and root.is_dir()
        and any((root / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
    )
    tables: dict[str, Any] = {}
    if saved and not any(kw.get(k) for k in (*_SPLITS, "files")):
        assert root is not None
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as e:
            raise SourceError(f"{source}: data.root {root}: cannot load the saved dataset ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            aliases = {"train": "train", "validation": "val", "val": "val", "test": "test"}
            tables = {aliases[k]: v for k, v in loaded.items() if k in aliases}
            if "train" not in tables:
                raise SourceError(
                    f"{source}: data.root {root}: the saved dataset has no train split ({list(loaded)})"
                )
            if "test" not in tables:
                tables["pool"] = tables.pop("train")
        else:
            tables = {"pool": loaded}
    else:
        files = split_files(cfg, kw, source, tuple(_DATASET_FORMATS))
        for split, paths in files.items():
            kinds = {fmt or _DATASET_FORMATS.get(p.suffix.lower()) for p in paths}
            if len(kinds) != 1 or None in kinds:
                raise SourceError(
                    f"{source}: the {split} files need one format (csv, json or text): set data.kwargs.format"
                )
            kind = kinds.pop()
            extra = {"delimiter": "\t"} if kind == "csv" and paths[0].suffix.lower() == ".tsv" else {}
            try:
                tables[split] = datasets.load_dataset(
                    kind, data_files=[str(p) for p in paths], split="train", **extra
                )
            except Exception as e:
                raise SourceError(
                    f"{source}: cannot load {', '.join(map(str, paths))} ({type(e).__name__}: {e})"
                ) from None
    rows = {}
    for split, table in tables.items():
        records = table.to_list()
        if kw.get("text_key") is None and "text" not in table.column_names and len(table.column_names) == 1:
            kw = {**kw, "text_key": table.column_names[0]}
        rows[split] = columns(records, kw, source, f"the {split} split")
    return text_bundle(cfg, seed, source, rows, kw)
