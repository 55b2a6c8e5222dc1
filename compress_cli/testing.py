"""Tiny seeded models, data and recipes, for our tests and for plugin authors' tests.

Everything here runs on CPU in well under a second::

    from compress_cli.testing import digits_bundle, tiny_mlp, tiny_recipe_dict

    model, data = tiny_mlp(seed=0), digits_bundle(limit_train=256)
    recipe = tiny_recipe_dict(tmp_path, stages=[{"type": "prune", "sparsity": 0.5}])
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.tasks import Evaluator, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.report import Metrics
    from compress_cli.sources.data import DataBundle


def seeded_zoo(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build ``zoo:name`` with weights drawn from ``seed`` (the global RNG state is left untouched)."""
    import torch

    from compress_cli.sources.zoo import build_zoo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_zoo(name, **kwargs)


def fake_metrics(accuracy: float, size_bytes: int, latency_ms: float, **kwargs: Any) -> Metrics:
    """A measurement as the pipeline reports it (for report, plot and compare tests): ``accuracy``
    (0..1), checkpoint bytes and batch-1 latency, on the CPU in torch eager unless ``kwargs`` say
    otherwise (any other :class:`~compress_cli.report.Metrics` field)."""
    from compress_cli.report import Metrics

    fields: dict[str, Any] = {"samples": 100, "params": 1000, "nonzero_params": 1000, "sparsity": 0.0}
    fields.update(runtime="torch-eager", device="cpu")
    fields.update(kwargs)
    return Metrics(accuracy=accuracy, size_bytes=size_bytes, latency_ms=latency_ms, **fields)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """``zoo:digits_mlp`` (1x8x8 -> 10, about 17k parameters), seeded."""
    return seeded_zoo("digits_mlp", seed)


def tiny_cnn(seed: int = 0) -> nn.Module:
    """``zoo:digits_cnn`` (1x8x8 -> 10, conv-BN-ReLU x2, about 10k parameters), seeded."""
    return seeded_zoo("digits_cnn", seed)


def tiny_resnet(seed: int = 0) -> nn.Module:
    """``zoo:digits_resnet`` (residual blocks with downsample shortcuts), seeded."""
    return seeded_zoo("digits_resnet", seed)


def permute_flatten_cnn(seed: int = 0) -> nn.Module:
    """A 1x8x8 -> 10 CNN whose forward ends in ``x.permute(0, 2, 1, 3).reshape(n, -1)`` before its
    classifier (a pitch tracker's layout): channel removal that assumes a channel-first flatten
    picks the wrong classifier columns. Seeded; about 12k parameters."""
    import torch
    from torch import nn

    class PermuteFlattenCNN(nn.Module):
        """conv-BN-ReLU x2, then the classifier over the (H, C, W)-ordered flattened features."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.fc(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PermuteFlattenCNN()
        for bn in (model.bn1, model.bn2):  # non-trivial statistics and affine terms
            bn.running_mean = torch.empty(bn.num_features).uniform_(-0.5, 0.5)
            bn.running_var = torch.empty(bn.num_features).uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    return model


def digits_bundle(
    seed: int = 0, batch_size: int = 64, limit_train: int | None = None, **data: Any
) -> DataBundle:
    """The embedded digits set split into train/val/test loaders (``data`` adds DataConfig fields)."""
    from compress_cli.config.recipe import DataConfig
    from compress_cli.sources.data import build_data

    cfg = DataConfig(source="digits", batch_size=batch_size, limit_train=limit_train, **data)
    return build_data(cfg, seed)


def save_tiny_checkpoint(path: str | Path, name: str = "digits_mlp", seed: int = 0) -> Path:
    """Write the seeded zoo model's ``state_dict`` to ``path`` (a .pt file, or a folder to put
    model.pt in)."""
    import torch

    p = Path(path)
    if p.suffix not in (".pt", ".pth"):
        p = p / "model.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seeded_zoo(name, seed).state_dict(), p)
    return p


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_recipe_dict(
    tmp_path: str | Path, stages: list[dict[str, Any]] | None = None, **overrides: Any
) -> dict[str, Any]:
    """A minimal valid recipe (digits MLP on CPU, quick latency) writing to ``tmp_path/out``.

    ``overrides`` are merged into the top level; dict values merge key by key (so
    ``data={"limit_train": 200}`` keeps the digits source), anything else replaces, including
    ``None`` (``measure={"latency": None}`` switches latency off).
    """
    base: dict[str, Any] = {
        "version": 1,
        "name": "test",
        "seed": 0,
        "device": "cpu",
        "model": {"source": "zoo:digits_mlp"},
        "data": {"source": "digits"},
        "measure": {"latency": {"batch_sizes": [1, 32], "warmup": 1, "iterations": 3, "remeasure_s": 0}},
        "output": str(Path(tmp_path) / "out"),
        "stages": copy.deepcopy(list(stages or [])),
    }
    return _merge(base, copy.deepcopy(overrides))


def tiny_state(
    model: nn.Module | str | dict[str, Any] | None = None,
    tmp_path: str | Path | None = None,
    seed: int = 0,
    limit_train: int | None = 512,
    **recipe_overrides: Any,
) -> Any:
    """A pipeline ``State`` over the digits data on CPU, for calling ``Stage.run`` directly in tests.

    ``model``: a source string (``"zoo:digits_cnn"``) or a recipe ``model`` mapping builds that
    model; an ``nn.Module`` replaces the built one (its architecture must match the source, which
    defaults to ``zoo:digits_mlp``, for checkpoints to reload).
    """
    import tempfile

    import torch

    if isinstance(model, str):
        recipe_overrides["model"], model = {"source": model}, None
    elif isinstance(model, dict):
        recipe_overrides["model"], model = model, None

    from compress_cli.config.recipe import Recipe
    from compress_cli.engine.setup import build_state

    out = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="compress-test-"))
    d = tiny_recipe_dict(out, data={"limit_train": limit_train}, seed=seed, **recipe_overrides)
    state = build_state(Recipe.model_validate(d), torch.device("cpu"), out / "out")
    if model is not None:
        state.model = model
    return state


def outlier_state(tmp_path: str | Path | None = None) -> Any:
    """A :func:`tiny_state` over ``zoo:outlier_cnn`` with a 1000x outlier channel, scored by cosine
    fidelity: plain int8 loses far more than a small budget, one layer back in float recovers it
    (the accuracy-budget tests of every scheme and of ``scheme: auto``)."""
    return tiny_state(
        {"source": "zoo:outlier_cnn", "kwargs": {"outlier": 1000.0}},
        tmp_path,
        task={"type": "fidelity", "primary": "cosine"},
        limit_train=128,
    )


def branchy_cnn(seed: int = 0, num_classes: int = 10, on_values: bool = False) -> nn.Module:
    """A 1x8x8 -> ``num_classes`` CNN (conv-BN-ReLU x2, a residual tap before one BN) whose forward
    branches on its input, which ``torch.fx`` cannot trace: on its shape (``if x.dim() == 3``, a
    graph capture with example inputs keeps it right), or with ``on_values`` on its values (``if
    x.sum() > 0``, which no graph capture can keep). Seeded."""
    import torch
    from torch import nn

    class BranchyCNN(nn.Module):
        """A branch on the input, conv1-bn1-relu, conv2-bn2 (+ conv2's own output: that BN does not
        fold), then a linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 8 * 8, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if on_values:
                if x.sum() > 0:
                    x = x * 0.5
            elif x.dim() == 3:  # one unbatched image
                x = x.unsqueeze(0)
            h = torch.relu(self.bn1(self.conv1(x)))
            y = self.conv2(h)
            h = torch.relu(self.bn2(y) + 0.1 * y)
            return self.fc(h.flatten(1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BranchyCNN()
        for bn in (model.bn1, model.bn2):  # non-trivial statistics: folding them changes the weights
            bn.get_buffer("running_mean").uniform_(-0.5, 0.5)
            bn.get_buffer("running_var").uniform_(0.5, 2.0)
    return model


def tiny_bert(seed: int = 0, num_classes: int = 3) -> nn.Module:
    """A 2-layer Hugging Face BERT classifier (hidden 32, 4 heads, vocabulary 100), seeded; called
    with keyword arguments ``input_ids`` and ``attention_mask``, it returns logits. Its attention
    mask is turned into ``(1 - mask) * finfo.min`` inside (mask arithmetic int8 must not touch)."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification

    class TinyBert(nn.Module):
        """BertForSequenceClassification returning its logits tensor."""

        def __init__(self) -> None:
            super().__init__()
            cfg = BertConfig(  # type: ignore[call-arg]  # its kwargs go to PretrainedConfig
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=100,
                max_position_embeddings=64,
                num_labels=num_classes,
                attn_implementation="eager",
            )
            self.bert = BertForSequenceClassification(cfg)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyBert().eval()


def bert_inputs(batch: int = 4, length: int = 16, seed: int = 0) -> dict[str, Any]:
    """Token ids and an attention mask (the last quarter of every other row padded) for
    :func:`tiny_bert`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[::2, length - length // 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- tasks (issue 16): a regression model and data, a custom task ------------------------------


def tiny_regressor(seed: int = 0, features: int = 8, outputs: int = 1) -> nn.Module:
    """A ``features -> 32 -> outputs`` ReLU MLP, seeded; ``(batch, features)`` in, ``(batch,
    outputs)`` out. :func:`regression_data` draws its targets from this very model."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, outputs)).eval()


def regression_data(
    train: int = 256,
    test: int = 128,
    features: int = 8,
    noise: float = 0.05,
    seed: int = 0,
    model_seed: int = 0,
) -> dict[str, Any]:
    """Synthetic regression splits for a ``data.source: compress_cli.testing:regression_data``
    recipe (``data.kwargs`` are these arguments): inputs ``x ~ N(0, 1)``, targets ``(N,)`` =
    ``tiny_regressor(model_seed)(x)`` plus Gaussian noise of ``noise`` times the targets' standard
    deviation, so that model scores R² of about ``1 - noise²`` and a damaged copy scores less.
    Returns ``{'train', 'test'}`` TensorDatasets."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(train + test, features, generator=g)
    with torch.no_grad():
        y = tiny_regressor(model_seed, features)(x)[:, 0]
    y = y + noise * y.std() * torch.randn(y.shape, generator=g)
    return {"train": TensorDataset(x[:train], y[:train]), "test": TensorDataset(x[train:], y[train:])}


class WithinBinsEvaluator(Evaluator):
    """Counts the predictions within ``tolerance`` classes of the label (see :class:`WithinBins`)."""

    def __init__(self, tolerance: int) -> None:
        super().__init__()
        self.tolerance, self.hits, self.exact = tolerance, 0, 0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        off = (pred.argmax(1) - target).abs()
        self.hits += int((off <= self.tolerance).sum())
        self.exact += int((off == 0).sum())
        self.samples += len(target)

    def compute(self) -> dict[str, float]:
        n = self.samples
        return {"within": self.hits / n, "accuracy": self.exact / n, "samples": n}


class WithinBins(Task):
    """A custom task (``task: {type: custom, source: compress_cli.testing:WithinBins}``) for
    ordered classes (pitch bins, age groups, ratings): a prediction within ``task.kwargs.tolerance``
    classes of the label counts as right. Loss: cross-entropy. The worked example of
    CONTRIBUTING.md's "Add a task"; recipes/custom_task.yaml runs it."""

    name = "within_bins"
    primary = "within"
    higher_is_better = True
    metrics = {
        "within": "share of predictions within task.kwargs.tolerance classes of the label",
        "accuracy": "top-1 accuracy",
    }
    options = {"tolerance": (1, "how many classes off still counts as right")}

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(pred, target)

    def evaluator(self) -> Evaluator:
        return WithinBinsEvaluator(int(self.option("tolerance")))


#: vocabulary, embedding width and sequence length of :func:`dict_model` and :func:`token_data`
DICT_VOCAB, DICT_WIDTH, DICT_SEQ = 50, 16, 12


@functools.cache
def _dict_model_class() -> type:
    """The :func:`dict_model` class, made once (torch is imported lazily; one class object, so a
    rebuilt model's modules have the classes of the run's)."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        """``x + fc2(relu(fc1(x)))``."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc1 = nn.Linear(width, 2 * width)
            self.fc2 = nn.Linear(2 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(x)))

    class DictModel(nn.Module):
        """Token ids and an attention mask in (keywords), a dict of logits and hidden states out."""

        def __init__(self, num_classes: int = 4) -> None:
            super().__init__()
            self.embed = nn.Embedding(DICT_VOCAB, DICT_WIDTH)
            self.blocks = nn.Sequential(Residual(DICT_WIDTH), Residual(DICT_WIDTH))
            self.head = nn.Linear(DICT_WIDTH, num_classes)
            self.conv = nn.Conv1d(DICT_WIDTH, DICT_WIDTH, 3, padding=1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.blocks(self.embed(input_ids))
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            logits = self.head(pooled)
            # the conv runs last: it is the output layer whose width channel removal keeps
            hidden = self.conv(h.transpose(1, 2)).transpose(1, 2)
            return {"logits": logits, "last_hidden_state": hidden}

    return DictModel


def dict_model(seed: int = 0, num_classes: int = 4) -> nn.Module:
    """A tiny token model with keyword inputs and a dict output, the structured counterpart of
    ``zoo:digits_cnn`` (about 4k parameters): ``forward(input_ids, attention_mask)`` returns
    ``{"logits": (batch, num_classes), "last_hidden_state": (batch, tokens, width)}``.

    Embedding -> two residual MLP blocks (Linear-ReLU-Linear plus the input: drop_layers can
    bypass them) -> masked mean pooling -> a Linear head (the logits); the hidden states are a
    Conv1d over the blocks' tokens (run last, so channel removal keeps its width). Every stage
    has something to act on: Linear and Conv1d layers (prune, prune_channels, quantize, codebook),
    residual blocks (drop_layers). Seeded."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = _dict_model_class()(num_classes)
        return model.eval()


class TokenDataset:
    """``n`` unlabelled samples ``{"input_ids": (seq,) int64, "attention_mask": (seq,) int64}`` drawn
    from ``seed`` (the last quarter of every other sample padded), or with ``labelled`` a ``labels``
    entry too (a class made from the ids, so it can be learnt). A map-style dataset."""

    def __init__(self, n: int, seed: int = 0, seq: int = DICT_SEQ, labelled: bool = False, classes: int = 4):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, DICT_VOCAB, (n, seq), generator=g)
        self.mask = torch.ones(n, seq, dtype=torch.long)
        self.mask[1::2, seq - seq // 4 :] = 0
        self.ids[self.mask == 0] = 0
        self.labels = (self.ids[:, 0] % classes) if labelled else None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def token_data(
    n_train: int = 256, n_test: int = 96, seq: int = DICT_SEQ, seed: int = 0, labelled: bool = False
) -> dict[str, TokenDataset]:
    """A ``package.module:callable`` data source for :func:`dict_model`: train and test splits of
    :class:`TokenDataset` (dict samples, unlabelled unless ``labelled``)::

        data: {source: "compress_cli.testing:token_data", kwargs: {n_train: 256}}
    """
    return {
        "train": TokenDataset(n_train, seed, seq, labelled),
        "test": TokenDataset(n_test, seed + 1, seq, labelled),
    }


def dict_recipe_dict(
    tmp_path: str | Path, stages: list[dict[str, Any]] | None = None, **overrides: Any
) -> dict[str, Any]:
    """:func:`tiny_recipe_dict` for :func:`dict_model` on unlabelled :func:`token_data` with
    ``task: fidelity`` (scored against the original model's logits)."""
    base = {
        "model": {"source": "compress_cli.testing:dict_model"},
        "data": {"source": "compress_cli.testing:token_data", "batch_size": 32, "eval_batch_size": 64},
        "task": "fidelity",
    }
    return tiny_recipe_dict(tmp_path, stages, **_merge(base, overrides))


def segmentation_data(
    train: int = 64, test: int = 32, size: int = 64, classes: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Synthetic segmentation splits for ``data.source: compress_cli.testing:segmentation_data``:
    each image holds ``classes - 1`` random rectangles (class 1.., painted in order, background 0),
    each class a random RGB colour plus noise; targets are the ``(size, size)`` int64 masks.
    Returns ``{'train', 'test'}`` TensorDatasets (set ``data.num_classes`` to ``classes``)."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    n = train + test
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for c in range(1, classes):
            x0, y0 = torch.randint(0, size - size // 4, (2,), generator=g).tolist()
            w, h = torch.randint(size // 8, size // 3, (2,), generator=g).tolist()
            masks[i, y0 : y0 + h, x0 : x0 + w] = c
    colours = torch.randn(classes, 3, generator=g)
    x = colours[masks].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return {"train": TensorDataset(x[:train], masks[:train]), "test": TensorDataset(x[train:], masks[train:])}
