"""Knowledge distillation: the KD loss, intermediate-feature matching, teacher-logit caching.

The ``distill`` stage (``stages/distill.py``) wires these into the shared training loop
(``training.train``) through its ``loss_fn`` and ``extra_params`` hooks; nothing here trains.

- :func:`kd_loss`: ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``
  (Hinton et al. 2015). The ``T^2`` keeps the soft term's gradient scale roughly independent of
  ``T``. ``alpha = 1`` never reads the labels (unlabelled data); ``alpha = 0`` never needs a teacher.
  Outputs that are not logits (embeddings, hidden states: whatever the task selects) are matched
  by MSE or cosine instead of KL, and the hard term may be the task's own loss.
- :class:`FeatureMatcher`: forward hooks on named student/teacher layers, MSE between their outputs,
  with a learned 1x1 convolution (4-D outputs) or Linear (other ranks) projecting the student's
  width to the teacher's when they differ. The projections live outside the student, so they are
  trained but never saved with it.
- :func:`teacher_logit_cache` + :class:`IndexedDataset`: one teacher pass over a fixed training set
  (the task-selected outputs of any batch structure); the training loader then yields each sample
  with its index and the loss looks up both the target and the teacher's output by index. Exact
  only for data without random augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress_cli.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from compress_cli.state import State
    from compress_cli.tasks.base import Task

#: the label an unlabelled sample gets, so the training loop's ``(x, y)`` unpacking works
NO_LABEL = -1


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    *,
    kind: str = "kl",
    hard_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``alpha * soft + (1 - alpha) * hard``, averaged over the batch.

    ``kind`` ``kl`` (logits): soft = ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)`` over the
    last dimension; ``mse``: the mean squared error to the teacher's output; ``cosine``: 1 - the
    mean per-sample cosine to it (embeddings, hidden states, any output). The hard term is
    ``hard_loss(student output)`` when given (a task's loss), else cross-entropy on ``targets``.
    The soft term is skipped when ``alpha == 0`` (no teacher needed), the hard term when
    ``alpha == 1`` (no labels needed). Computed in float32 whatever the autocast dtype.
    """
    import torch.nn.functional as F

    s = student_logits.float()
    total = None
    if alpha > 0:
        if teacher_logits is None:
            raise StageError("distillation with alpha > 0 needs the teacher's logits")
        t = teacher_logits.float().detach()
        if t.shape != s.shape:
            raise StageError(
                f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape"
            )
        if kind == "kl":
            T = float(temperature)
            soft = (
                F.kl_div(
                    F.log_softmax(s / T, dim=-1),
                    F.log_softmax(t / T, dim=-1),
                    reduction="batchmean",
                    log_target=True,
                )
                * T
                * T
            )
        elif kind == "cosine":
            soft = (
                1 - F.cosine_similarity(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), dim=1)
            ).mean()
        else:
            soft = F.mse_loss(s, t)
        total = alpha * soft
    if alpha < 1:
        if hard_loss is not None:
            hard = hard_loss(student_logits)
        else:
            if targets is None:
                raise StageError(
                    "alpha < 1 needs labels for the cross-entropy term (use alpha: 1 on unlabelled data)"
                )
            hard = F.cross_entropy(s, targets, label_smoothing=label_smoothing)
        total = (1 - alpha) * hard if total is None else total + (1 - alpha) * hard
    assert total is not None  # alpha is in [0, 1]: one of the terms ran
    return total


# --------------------------------------------------------------------------- feature matching
class FeatureTap:
    """Keeps the latest output of each named module (forward hooks); ``close()`` removes them."""

    def __init__(self, model: nn.Module, names: list[str], role: str):
        from compress_cli.errors import did_you_mean

        mods = dict(model.named_modules())
        self.outputs: dict[str, Any] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            if name not in mods or not name:
                raise StageError(
                    f"features: the {role} has no layer {name!r}{did_you_mean(name, [n for n in mods if n])}"
                )
            self._handles.append(mods[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, (tuple, list)):
                out = out[0]
            self.outputs[name] = out

        return hook

    def get(self, name: str) -> torch.Tensor:
        """The latest output of layer ``name``; StageError when it did not run in the forward pass."""
        out = self.outputs.get(name)
        if out is None:
            raise StageError(f"features: layer {name!r} did not run in the forward pass")
        return out

    def close(self) -> None:
        """Remove the hooks and drop the kept outputs."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}


def make_projection(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module | None:
    """A learned map from the student's feature width to the teacher's, or None when they match.

    4-D (N, C, H, W) features get a 1x1 convolution over channels; any other rank a Linear over the
    last dimension. Spatial sizes must agree (or are pooled to the teacher's by the matcher).
    """
    from torch import nn

    if len(student_shape) != len(teacher_shape):
        raise StageError(
            f"features: student output {list(student_shape)} and teacher output {list(teacher_shape)} "
            "have different ranks"
        )
    if len(teacher_shape) == 4:
        cs, ct = student_shape[1], teacher_shape[1]
        return None if cs == ct else nn.Conv2d(cs, ct, 1, bias=False)
    ws, wt = student_shape[-1], teacher_shape[-1]
    if student_shape[1:-1] != teacher_shape[1:-1]:
        raise StageError(
            f"features: student output {list(student_shape)} and teacher output {list(teacher_shape)} "
            "differ in more than their last dimension"
        )
    return None if ws == wt else nn.Linear(ws, wt, bias=False)


class FeatureMatcher:
    """MSE between named student and teacher layer outputs, with projections where widths differ.

    ``pairs`` are ``(student layer, teacher layer, weight)``. Shapes are read from one forward pass
    of ``example`` through both models; the projections start from a seeded random init.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: list[tuple[str, str, float]],
        example: Any,
        device: torch.device,
    ):
        import torch
        from torch import nn

        from compress_cli._utils.batches import call

        self.pairs = pairs
        self.s_tap = FeatureTap(student, [p[0] for p in pairs], "student")
        try:
            self.t_tap = FeatureTap(teacher, [p[1] for p in pairs], "teacher")
        except StageError:
            self.s_tap.close()
            raise
        try:
            was_training = student.training
            student.eval()
            with torch.no_grad():
                call(student, example)
                call(teacher, example)
            student.train(was_training)
            self.projections = nn.ModuleList()
            self.shapes: list[dict[str, Any]] = []
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for s_name, t_name, w in pairs:
                    s_shape = tuple(self.s_tap.get(s_name).shape)
                    t_shape = tuple(self.t_tap.get(t_name).shape)
                    proj = make_projection(s_shape, t_shape)
                    self.projections.append(proj if proj is not None else nn.Identity())
                    self.shapes.append(
                        {
                            "student": s_name,
                            "teacher": t_name,
                            "weight": w,
                            "student_shape": list(s_shape[1:]),
                            "teacher_shape": list(t_shape[1:]),
                            "projection": type(proj).__name__ if proj is not None else None,
                        }
                    )
            self.projections.to(device)
        except Exception:
            self.close()
            raise

    def parameters(self) -> list[torch.nn.Parameter]:
        """The projections' parameters (trained along with the student)."""
        return list(self.projections.parameters())

    def loss(self) -> torch.Tensor:
        """Weighted MSE over the pairs, from the outputs of the latest student and teacher forward."""
        import torch.nn.functional as F

        total = None
        for (s_name, t_name, w), proj in zip(self.pairs, self.projections, strict=True):
            s = proj(self.s_tap.get(s_name).float())
            t = self.t_tap.get(t_name).float().detach()
            if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, (int(t.shape[-2]), int(t.shape[-1])))
            term = w * F.mse_loss(s, t)
            total = term if total is None else total + term
        assert total is not None
        return total

    def close(self) -> None:
        """Remove the forward hooks from both models."""
        self.s_tap.close()
        if hasattr(self, "t_tap"):
            self.t_tap.close()


# --------------------------------------------------------------------------- data helpers
class IndexedDataset:
    """``(sample, index)`` for every sample of ``dataset``, the sample whole (a tensor, tuple or
    dict); the training loop splits it with the task and looks the teacher's output up by index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], i


class LabelledView:
    """``(x, y)`` for datasets whose items are ``x`` or ``(x,)`` (y = ``NO_LABEL``); others pass through."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            return (item[0], item[1]) if len(item) > 1 else (item[0], NO_LABEL)
        return item, NO_LABEL


def has_labels(dataset: Dataset) -> bool:
    """Whether the dataset's items carry a label (looks at the first item)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False
    item = dataset[0]
    return isinstance(item, (tuple, list)) and len(item) > 1


def train_loader(state: State, dataset: Any, batch_size: int | None) -> DataLoader:
    """A training loader over ``dataset`` that shuffles exactly like ``state.data.loader('train')``
    (same seed, so a distill run sees the batches a finetune run would), sharded under torchrun."""
    import torch
    from torch.utils.data import DataLoader

    from compress_cli.runtime import distributed as dist_

    data = state.data
    bs = batch_size or data.batch_size
    if dist_.active():
        sampler = dist_.train_sampler(dataset, data.seed)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=data.num_workers)
    g = torch.Generator()
    g.manual_seed(data.seed)
    return DataLoader(dataset, batch_size=bs, shuffle=True, generator=g, num_workers=data.num_workers)


#: refuse to hold more than this many bytes of cached teacher logits
CACHE_LIMIT_BYTES = 2 * 1024**3


def teacher_logit_cache(
    teacher: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    task: Task | None = None,
) -> tuple[torch.Tensor, Any]:
    """(the teacher's selected outputs (N, ...), the targets) over ``dataset`` in order, on ``device``.

    Each batch is split by ``task`` (classification when None) and the teacher's output selected
    by it: logits, an embedding, any tensor. The targets are one tensor (N, ...) when the data has
    them, else None. One pass in eval mode without gradients.
    """
    import torch
    from torch.utils.data import DataLoader

    from compress_cli._utils.batches import concat, to_device

    if task is None:
        from compress_cli.config.recipe import TaskConfig
        from compress_cli.tasks import build_task

        task = build_task(TaskConfig())
    loader: DataLoader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    outputs: list[torch.Tensor] = []
    targets: list[Any] = []
    teacher.eval()
    n = len(dataset)  # type: ignore[arg-type]
    with torch.no_grad():  # not inference_mode: the cached tensors take part in autograd-recorded ops later
        for batch in loader:
            x, y = task.split(batch)
            out = task.forward(teacher, to_device(x, device)).float()
            if not outputs and out.numel() // max(1, out.shape[0]) * n * 4 > CACHE_LIMIT_BYTES:
                raise StageError(
                    f"cache_teacher: {n} samples x {list(out.shape[1:])} outputs exceed "
                    f"{CACHE_LIMIT_BYTES // 1024**3} GiB; set cache_teacher: false"
                )
            outputs.append(out)
            targets.append(to_device(y, device) if y is not None else None)
    labels = None if any(t is None for t in targets) else concat(targets)
    return torch.cat(outputs), labels


def freeze_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, no gradients, on ``device``."""
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
