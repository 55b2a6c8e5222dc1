"""Every built-in task's metrics and loss against numbers worked out by hand (small tensors, the
arithmetic in the comments), fed in more than one batch so accumulation is tested too."""

from __future__ import annotations

import math

import pytest
import torch

from compress_cli.config.recipe import TaskConfig
from compress_cli.errors import StageError
from compress_cli.tasks import build_task


def task(type_: str, num_classes: int | None = None, **cfg):
    return build_task(TaskConfig(type=type_, **cfg), num_classes)


def run(t, batches):
    """The task's metrics over ``batches`` of (pred, target, reference)."""
    ev = t.evaluator()
    for pred, target, ref in batches:
        ev.update(pred, target, ref)
    return ev.compute()


def test_classification_accuracy_and_cross_entropy():
    # logits put sample 0 on class 0 (right), sample 1 on class 2 (label 1: wrong), sample 2 on 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2])
    res = run(task("classification", 3), [(logits[:2], labels[:2], None), (logits[2:], labels[2:], None)])
    # CE = log(sum exp) - logit of the label: log(e^2+2) - 2, log(e+2) - 0, log(e^3+2) - 3
    ce = (math.log(math.e**2 + 2) - 2 + math.log(math.e + 2) + math.log(math.e**3 + 2) - 3) / 3
    assert res == pytest.approx({"accuracy": 2 / 3, "loss": ce, "samples": 3})
    assert "top5" not in res  # only with more than 5 classes


def test_fidelity_cosine_sqnr_relative_mse_agreement():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    res = run(task("fidelity"), [(pred[:1], None, ref[:1]), (pred[1:], None, ref[1:])])
    # same directions: cosine 1; signal = 1 + 1, noise = (2 - 1)^2 = 1
    assert res == pytest.approx(
        {"cosine": 1.0, "sqnr_db": 10 * math.log10(2), "relative_mse": 0.5, "agreement": 1.0, "samples": 2}
    )


def test_regression_mse_mae_r2():
    pred = torch.tensor([[1.0], [2.0], [3.5], [4.0]])  # (N, 1) against (N,) targets
    target = torch.tensor([1.0, 3.0, 3.0, 5.0])
    res = run(task("regression"), [(pred[:2], target[:2], None), (pred[2:], target[2:], None)])
    # errors 0, -1, 0.5, -1; mean target 3, total sum of squares 4 + 0 + 0 + 4 = 8, residual 2.25
    assert res == pytest.approx({"mse": 2.25 / 4, "mae": 2.5 / 4, "r2": 1 - 2.25 / 8, "samples": 4})
    assert float(task("regression").loss(pred, target, None)) == pytest.approx(0.5625)


def test_regression_several_outputs_average_r2_over_outputs():
    pred = torch.tensor([[0.0, 1.0], [1.0, 2.0], [1.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 4.0]])
    res = run(task("regression"), [(pred, target, None)])
    # column 0: residual 1, mean 1, total 2 -> 0.5; column 1: residual 1, mean 2, total 6 -> 5/6
    assert res["r2"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert res["mse"] == pytest.approx(2 / 6)
    with pytest.raises(StageError, match="at least 2"):
        run(task("regression"), [(pred[:1], target[:1], None)])


# multilabel: 4 samples, 3 labels; label 2 has no positive in the split (left out of the averages)
ML_LOGITS = torch.tensor([[2.0, 1.0, -3.0], [-1.0, 3.0, -3.0], [0.5, -1.0, -3.0], [-2.0, 0.2, 1.0]])
ML_TARGET = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]])
ML_TARGET[2, 1] = 0  # label 1 positives: samples 1 and 3


def test_multilabel_map_f1_bce():
    batches = [(ML_LOGITS[:3], ML_TARGET[:3], None), (ML_LOGITS[3:], ML_TARGET[3:], None)]
    res = run(task("multilabel", 3), batches)
    # label 0 ranked by score: s0(+) s2(+) s1 s3 -> AP 1; label 1: s1(+) s0 s3(+) s2 -> (1/1 + 2/3) / 2
    assert res["map"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    # p > 0.5 means logit > 0: label 0 predicts s0, s2 (exact) -> F1 1; label 1 predicts s0, s1, s3:
    # TP 2, FP 1, FN 0 -> 2*2 / (2*2 + 1) = 0.8
    assert res["f1"] == pytest.approx((1 + 0.8) / 2)
    # BCE with logits: log(1 + e^-x) for a positive, log(1 + e^x) for a negative, mean of 12
    bce = sum(
        math.log1p(math.exp(-x if y else x))
        for row, trow in zip(ML_LOGITS.tolist(), ML_TARGET.tolist(), strict=True)
        for x, y in zip(row, trow, strict=True)
    )
    assert res["loss"] == pytest.approx(bce / 12, rel=1e-6)
    assert float(task("multilabel").loss(ML_LOGITS, ML_TARGET, None)) == pytest.approx(bce / 12, rel=1e-6)
    assert res["samples"] == 4


def test_multilabel_threshold():
    res = run(task("multilabel", 3, kwargs={"threshold": 0.8}), [(ML_LOGITS, ML_TARGET, None)])
    # p > 0.8 means logit > log 4 = 1.386: label 0 predicts s0 only (TP 1, FN 1) -> 2/3; label 1
    # predicts s1 only (TP 1, FN 1) -> 2/3
    assert res["f1"] == pytest.approx(2 / 3)


def seg_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, C, H, W) logits: 5 on the class of ``labels`` (N, H, W), 0 elsewhere."""
    return torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float() * 5


def test_segmentation_pixel_accuracy_miou_loss():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])  # 255: ignored
    predicted = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    logits = seg_logits(predicted, 4)  # class 3 never occurs: left out of the mean
    t = task("segmentation", 4)
    # the same image twice: masks as (N, H, W) and as (N, 1, H, W); the ratios are those of one
    res = run(t, [(logits, target, None), (logits, target[:, None], None)])
    # 5 counted pixels: right at (0,0), (0,2), (1,0) -> 3/5. IoU: class 0: TP 1, FN 1 -> 1/2;
    # class 1: TP 2, FP 2 -> 1/2; class 2: FN 1 -> 0; mean over 3 classes
    assert res["pixel_accuracy"] == pytest.approx(0.6)
    assert res["miou"] == pytest.approx(1 / 3)
    # CE: a right pixel log(1 + 3 e^-5), a wrong one log(e^5 + 3)
    ce = (3 * math.log(1 + 3 * math.exp(-5)) + 2 * math.log(math.exp(5) + 3)) / 5
    assert res["loss"] == pytest.approx(ce, rel=1e-6)
    assert float(t.loss(logits, target, None)) == pytest.approx(ce, rel=1e-6)
    assert res["samples"] == 2


def test_segmentation_without_ignore_index_counts_every_pixel():
    target = torch.tensor([[[0, 1]]])
    res = run(task("segmentation", 2, kwargs={"ignore_index": None}), [(seg_logits(target, 2), target, None)])
    assert res["pixel_accuracy"] == 1.0 and res["miou"] == 1.0


def test_embedding_cosine_to_original():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    ref = torch.tensor([[1.0, 0.0]] * 4)
    res = run(task("embedding"), [(pred[:3], None, ref[:3]), (pred[3:], None, ref[3:])])
    assert res == pytest.approx({"cosine": (1 + 0 + 1 / math.sqrt(2) + 1) / 4, "samples": 4})
    # loss: cosine distance to the original, 1 - cos
    assert float(task("embedding").loss(pred[:2], None, ref[:2])) == pytest.approx(0.5)


def test_embedding_spearman_of_pair_similarities():
    # pairs (0,1), (2,3), (4,5) with cosine 1, 0, 0.5; scores 2, 1, 5 (each sample carries its
    # pair's): ranks of the similarities 3, 1, 2, of the scores 2, 1, 3; d = 1, 0, -1 ->
    # rho = 1 - 6 * 2 / (3 * (9 - 1)) = 0.5
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.75**0.5]])
    scores = torch.tensor([2.0, 2.0, 1.0, 1.0, 5.0, 5.0])
    t = task("embedding", kwargs={"pair_scores": True}, primary="spearman")
    res = run(t, [(emb[:3], scores[:3], emb[:3]), (emb[3:], scores[3:], emb[3:])])  # a pair split
    # (torchmetrics adds 1e-6 to the denominator of the correlation)
    assert res == pytest.approx({"cosine": 1.0, "spearman": 0.5, "samples": 6}, abs=1e-5)
    assert t.report_fields(res)["score"] == pytest.approx(0.5, abs=1e-5)

    broken = scores.clone()
    broken[3] = 7.0
    with pytest.raises(StageError, match=r"samples 2 and 3 .* different scores \(1, 7\)"):
        run(t, [(emb[:3], broken[:3], emb[:3]), (emb[3:], broken[3:], emb[3:])])
    with pytest.raises(StageError, match="even number"):
        run(t, [(emb[:5], scores[:5], emb[:5])])
