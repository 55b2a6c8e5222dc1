"""``embedding``: a model that maps each sample to a vector (sentence embeddings, image
descriptors). Scored against the original model's embedding of the same sample (cosine), and,
with ``task.kwargs.pair_scores: true``, by how well the cosine similarities of sample pairs rank
like human similarity scores (Spearman, torchmetrics' ``SpearmanCorrCoef``; the STS-benchmark
convention).

Pairs: consecutive samples of the evaluation split, (0, 1), (2, 3), ..., form one pair, and both
carry the pair's score as their target (``task.target`` names it). Keep the split in order and
whole (no ``data.limit_test``, no val carved from it): a sample whose partner carries another
score means a broken pair and stops the evaluation. Without ``pair_scores`` any target is ignored
(unlabelled data is fine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress_cli.errors import RecipeError, SourceError, StageError
from compress_cli.tasks._metrics import quiet, shape, value
from compress_cli.tasks.base import Evaluator, Task
from compress_cli.tasks.registry import register_task

if TYPE_CHECKING:
    import torch


class EmbeddingEvaluator(Evaluator):
    """Mean cosine to the original's embeddings; with pair scores, Spearman's rank correlation of
    the pairs' cosine similarities with their scores (a sample left over from a batch of odd size
    waits for its partner in the next)."""

    def __init__(self, pair_scores: bool) -> None:
        super().__init__()
        self.pair_scores = pair_scores
        self.cos_sum = 0.0
        self.spearman: Any = None
        self.pending: tuple[torch.Tensor, float] | None = None
        self.pairs = 0

    def update(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> None:
        import torch.nn.functional as F

        assert reference is not None
        p = pred.float().reshape(pred.shape[0], -1)
        r = reference.float().reshape(reference.shape[0], -1)
        self.cos_sum += float(F.cosine_similarity(p, r, dim=1, eps=1e-12).sum())
        if self.pair_scores:
            self._pairs(p, target)
        self.samples += int(pred.shape[0])

    def _pairs(self, emb: torch.Tensor, target: Any) -> None:
        import torch
        import torch.nn.functional as F
        from torchmetrics.regression import SpearmanCorrCoef

        if target is None:
            raise StageError("task.kwargs.pair_scores: the evaluation data has no scores (set task.target)")
        scores = [float(s) for s in torch.as_tensor(target).reshape(-1)]
        items = [(emb[i], scores[i]) for i in range(emb.shape[0])]
        start = self.samples  # split position of items[0]
        if self.pending is not None:
            items.insert(0, self.pending)
            start -= 1
        self.pending = items.pop() if len(items) % 2 else None
        if not items:
            return
        for k in range(0, len(items), 2):
            if items[k][1] != items[k + 1][1]:
                at = start + k
                raise StageError(
                    f"task embedding: samples {at} and {at + 1} of the evaluation split form a pair but "
                    f"carry different scores ({items[k][1]:g}, {items[k + 1][1]:g}); both samples of a "
                    "pair carry its score, in order: keep the split whole (no data.limit_test)"
                )
        a = torch.stack([items[k][0] for k in range(0, len(items), 2)])
        b = torch.stack([items[k][0] for k in range(1, len(items), 2)])
        s = torch.tensor([items[k][1] for k in range(0, len(items), 2)], dtype=torch.float64)
        if self.spearman is None:
            with quiet():
                self.spearman = SpearmanCorrCoef()
        self.spearman.update(F.cosine_similarity(a, b, dim=1, eps=1e-12).double(), s)
        self.pairs += len(s)

    def compute(self) -> dict[str, float]:
        res: dict[str, float] = {"cosine": self.cos_sum / self.samples}
        if self.pair_scores:
            if self.pending is not None or self.pairs < 2:
                raise StageError(
                    f"task.kwargs.pair_scores: the evaluation split has {self.samples} samples; pairs "
                    "need an even number, at least 4"
                )
            res["spearman"] = value(self.spearman)
        res["samples"] = self.samples
        return res


@register_task
class Embedding(Task):
    """One vector per sample, scored against the original model's (cosine) and optionally by the
    rank correlation of pair similarities with given scores. Loss: cosine distance to the
    original's embedding (label-free). Primary metric: cosine."""

    name = "embedding"
    primary = "cosine"
    higher_is_better = True
    needs_labels = False
    needs_reference = True
    metrics = {
        "cosine": "mean cosine similarity of each sample's embedding to the original model's",
        "spearman": "Spearman rank correlation of the cosine similarity of pairs (samples 2i, 2i+1) "
        "with their scores (task.kwargs.pair_scores)",
    }
    options = {
        "pair_scores": (
            False,
            "the target is a similarity score per pair of consecutive samples (both carry it): adds spearman",
        )
    }

    def __init__(self, cfg: Any, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        pairs = self.option("pair_scores")
        if not isinstance(pairs, bool):
            raise RecipeError(f"task.kwargs.pair_scores: true or false (got {pairs!r})")
        if self.primary == "spearman" and not pairs:
            raise RecipeError("task.primary: spearman needs task.kwargs.pair_scores: true (and scores)")
        self.pair_scores = pairs

    def loss(self, pred: torch.Tensor, target: Any, reference: torch.Tensor | None) -> torch.Tensor:
        from compress_cli.tasks.fidelity import distance_loss

        assert reference is not None
        return distance_loss(pred.float(), reference.float(), "cosine")

    def evaluator(self) -> Evaluator:
        return EmbeddingEvaluator(self.pair_scores)

    def check_output(self, pred: torch.Tensor, target: Any) -> None:
        import torch

        if pred.dim() != 2:
            hint = (
                "pool the tokens with task.output: mean_pool (or cls)"
                if pred.dim() == 3
                else "pick the embedding with task.output"
            )
            raise SourceError(
                f"task embedding: the model's output should be (batch, features), got {shape(pred)}; {hint}"
            )
        if not self.pair_scores:
            return
        if not isinstance(target, torch.Tensor) or target.reshape(-1).shape[0] != pred.shape[0]:
            raise SourceError(
                f"task embedding: task.kwargs.pair_scores needs one score per sample (batch,) = "
                f"({pred.shape[0]},), got {shape(target)}; point task.target at the scores"
            )
