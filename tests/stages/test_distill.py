"""distill: the KD loss against a hand computation, T and alpha behaviour, the teacher left untouched,
student replacement rebuilt by load(), feature matching with a projection that is not saved,
unlabelled data, teacher-logit caching, and the static checks."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import TensorDataset

import compress_cli
from compress_cli.config.recipe import Recipe
from compress_cli.config.yaml import parse_yaml
from compress_cli.distillation import FeatureMatcher, kd_loss
from compress_cli.engine.run import run_recipe
from compress_cli.engine.setup import build_state
from compress_cli.errors import RecipeError, StageError
from compress_cli.stages.registry import get_stage, validate
from compress_cli.state import save_snapshot
from compress_cli.testing import seeded_zoo, tiny_recipe_dict


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A digits_cnn trained for a few epochs (about 90% test accuracy), as a state_dict file."""
    from compress_cli.training import TrainOptions, train

    tmp = tmp_path_factory.mktemp("teacher")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = make_state(tmp, model="zoo:digits_cnn")
        train(state.model, state, TrainOptions(epochs=4, lr=0.01), validate=False)
    finally:
        torch.set_num_threads(n)
    p = tmp / "teacher.pt"
    torch.save(state.model.state_dict(), p)
    return p


def make_state(
    tmp_path: Path,
    model: str = "zoo:digits_cnn",
    checkpoint: str | Path | None = None,
    limit_train: int | None = 512,
    seed: int = 0,
):
    m = {"source": model, **({"checkpoint": str(checkpoint)} if checkpoint else {})}
    d = tiny_recipe_dict(tmp_path, model=m, data={"limit_train": limit_train}, seed=seed)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return build_state(Recipe.model_validate(d), torch.device("cpu"), out)


def run_stage(state, index: int = 1, **cfg):
    cls = get_stage("distill")
    return cls(cls.config_class.model_validate({"type": "distill", **cfg}), index).run(state)


def accuracy(model, state) -> float:
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner

    return evaluate(EagerRunner(model, state.device), state.data.loader("test"), state.data.get_task())[
        "accuracy"
    ]


# ------------------------------------------------------------------ the loss
#: for the logits below: mean KL(p_t || p_s) at T=2 is 0.148432, mean CE 0.389572;
#: 0.3 * 2^2 * 0.148432 + 0.7 * 0.389572 = 0.450819
EXPECTED_KD = 0.450819


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.3

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for i in range(2):
        p_t = softmax([v / T for v in t[i].tolist()])
        p_s = softmax([v / T for v in s[i].tolist()])
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
        ce += -math.log(softmax(s[i].tolist())[int(y[i])])
    expected = alpha * T * T * kl / 2 + (1 - alpha) * ce / 2
    got = kd_loss(s, t, y, T, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(got) == pytest.approx(EXPECTED_KD, abs=1e-4)  # the number, worked out once by hand


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_pure_kd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    assert torch.allclose(kd_loss(s, None, y, 4.0, 0.0), F.cross_entropy(s, y))  # no teacher needed
    assert torch.allclose(
        kd_loss(s, t, y, 4.0, 0.0, label_smoothing=0.1), F.cross_entropy(s, y, label_smoothing=0.1)
    )
    pure = kd_loss(s, t, None, 4.0, 1.0)  # no labels needed
    manual = 16.0 * (F.softmax(t / 4, 1) * (F.log_softmax(t / 4, 1) - F.log_softmax(s / 4, 1))).sum(1).mean()
    assert torch.allclose(pure, manual, atol=1e-6)
    assert float(kd_loss(t, t, None, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)  # student == teacher: no loss
    with pytest.raises(StageError, match="needs labels"):
        kd_loss(s, t, None, 4.0, 0.5)
    with pytest.raises(StageError, match="teacher"):
        kd_loss(s, None, y, 4.0, 0.5)


def test_t_squared_keeps_the_gradient_scale():
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)

    def grad_norm(T: float, scaled: bool) -> float:
        s = s0.clone().requires_grad_(True)
        loss = kd_loss(s, t, None, T, 1.0)
        (loss if scaled else loss / (T * T)).backward()
        return float(s.grad.norm())

    with_t2 = grad_norm(8.0, True) / grad_norm(4.0, True)
    without = grad_norm(8.0, False) / grad_norm(4.0, False)
    assert 0.8 < with_t2 < 1.1  # about T-independent
    assert without < 0.3  # the plain soft loss's gradient shrinks about as 1/T^2 (here ~1/4)
    # a higher temperature gives softer targets: the teacher's distribution has more entropy
    ent = [float(-(F.softmax(t / T, 1) * F.log_softmax(t / T, 1)).sum(1).mean()) for T in (1.0, 4.0)]
    assert ent[1] > ent[0]


# ------------------------------------------------------------------ the stage
def test_a_big_original_waits_on_disk_and_teaches_the_same(tmp_path, teacher_ckpt, monkeypatch):
    """Over ORIGINAL_IN_MEMORY_MAX the frozen original is a file read back per use (not a second
    in-memory copy for the whole run); distillation from it gives the same student, bit for bit."""
    import gc

    import compress_cli.engine.setup as pipeline

    students = []
    for limit in (None, 0):
        if limit is not None:
            monkeypatch.setattr(pipeline, "ORIGINAL_IN_MEMORY_MAX", limit)
        state = make_state(tmp_path / str(limit), checkpoint=teacher_ckpt)
        state.model = seeded_zoo("digits_cnn", seed=3)
        teacher = state.original_model()
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            ref = seeded_zoo("digits_cnn").eval()
            ref.load_state_dict(torch.load(teacher_ckpt))
            assert torch.equal(teacher(x), ref(x))
        run_stage(state, epochs=1, lr=0.01, alpha=0.9, temperature=4.0)
        students.append(state.model.state_dict())
        if limit is not None:
            path = state.original
            assert isinstance(path, Path) and path.is_file()
            del state
            gc.collect()
            assert not path.parent.exists()  # removed with the run's state
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_teacher_untouched_and_student_learns_from_it(tmp_path, teacher_ckpt):
    state = make_state(tmp_path, checkpoint=teacher_ckpt)
    state.model = seeded_zoo("digits_cnn", seed=3)  # a fresh student of the same shape
    before = copy.deepcopy(state.original.state_dict())
    acc0 = accuracy(state.model, state)
    res = run_stage(state, epochs=3, lr=0.01, alpha=0.9, temperature=4.0)
    after = state.original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not state.original.training
    assert not any(p.requires_grad for p in state.original.parameters())
    assert all(p.grad is None for p in state.original.parameters())
    assert res.details["teacher"] == "original" and res.details["epochs_run"] == 3
    assert accuracy(state.model, state) > max(0.7, acc0 + 0.3)


def test_student_replacement_is_recorded_and_reloads(tmp_path, teacher_ckpt):
    state = make_state(tmp_path, checkpoint=teacher_ckpt)
    res = run_stage(state, student={"source": "zoo:digits_resnet", "kwargs": {"width": 8}}, epochs=2, lr=0.01)
    assert state.model_spec.source == "zoo:digits_resnet" and state.model_spec.kwargs == {"width": 8}
    assert res.details["student"]["params_before"] == sum(
        p.numel() for p in seeded_zoo("digits_cnn").parameters()
    )
    assert res.details["student"]["params_after"] == sum(p.numel() for p in state.model.parameters())
    assert state.edits.to_json()[-1]["op"] == "replace_model"
    d = tmp_path / "snap"
    save_snapshot(state, d)
    manifest = json.loads((d / "manifest.json").read_text())
    assert (manifest["model"]["source"], manifest["model"]["kwargs"], manifest["model"]["checkpoint"]) == (
        "zoo:digits_resnet",
        {"width": 8},
        None,
    )
    assert manifest["architecture"] == []  # the base is the student itself: no diff to replay
    assert manifest["edits"][-1]["source"] == "zoo:digits_resnet"
    loaded = compress_cli.load(d)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), state.model(x), atol=1e-6)
    assert type(loaded.layer1[0]).__name__ == "BasicBlock"


def test_student_swap_through_a_recipe(tmp_path, teacher_ckpt):
    d = tiny_recipe_dict(
        tmp_path,
        model={"source": "zoo:digits_cnn", "checkpoint": str(teacher_ckpt)},
        data={"limit_train": 384},
        measure={"latency": None, "macs": False},
        stages=[
            {"type": "distill", "student": "zoo:digits_mlp", "epochs": 2, "lr": 0.01, "cache_teacher": True}
        ],
    )
    report = run_recipe(validate(parse_yaml(yaml.safe_dump(d))))
    assert report["edits"][0]["op"] == "replace_model"
    assert report["final"]["params"] == sum(p.numel() for p in seeded_zoo("digits_mlp").parameters())
    model = compress_cli.load(tmp_path / "out" / "model")
    assert type(model.fc1).__name__ == "Linear"
    assert report["final"]["accuracy"] > 0.5


def test_teacher_from_a_model_dir_and_from_a_spec(tmp_path, teacher_ckpt):
    state = make_state(tmp_path, model="zoo:digits_mlp")  # the original is an untrained MLP
    teacher_dir = tmp_path / "teacher_dir"
    t_state = make_state(tmp_path / "t", checkpoint=teacher_ckpt)
    save_snapshot(t_state, teacher_dir)
    acc_t = accuracy(t_state.model, t_state)
    for teacher in (str(teacher_dir), {"source": "zoo:digits_cnn", "checkpoint": str(teacher_ckpt)}):
        state.model = seeded_zoo("digits_mlp", seed=5)
        res = run_stage(state, teacher=teacher, alpha=1.0, epochs=4, lr=0.01)
        assert res.details["teacher"].startswith(
            str(teacher_dir) if isinstance(teacher, str) else "zoo:digits_cnn"
        )
        assert accuracy(state.model, state) > acc_t - 0.2  # it learnt the trained teacher, not the random MLP


def test_feature_matching_with_projection_is_trained_and_not_saved(tmp_path, teacher_ckpt):
    state = make_state(tmp_path, checkpoint=teacher_ckpt)
    res = run_stage(
        state,
        student={"source": "zoo:digits_resnet", "kwargs": {"width": 8}},
        epochs=1,
        lr=0.01,
        features=[
            {"student": "layer1", "teacher": "relu2", "weight": 0.5},  # 8 -> 32 channels, 8x8
            {"student": "layer3", "teacher": "pool"},
        ],
    )  # 32 (2x2) -> 32 (4x4)
    f = res.details["features"]
    assert (
        f[0]["projection"] == "Conv2d"
        and f[0]["student_shape"] == [8, 8, 8]
        and f[0]["teacher_shape"] == [32, 8, 8]
    )
    assert f[1]["projection"] is None
    assert not state.model._forward_hooks and not state.original.relu2._forward_hooks  # hooks removed
    assert all(not m._forward_hooks for m in state.model.modules())
    d = tmp_path / "snap"
    save_snapshot(state, d)
    keys = set(compress_cli.load(d).state_dict())
    assert keys == set(state.model.state_dict()) and not any("proj" in k for k in keys)


def test_feature_matcher_projection_gets_gradients():
    student, teacher = seeded_zoo("digits_mlp", 1), seeded_zoo("digits_mlp", 2)
    x = torch.randn(4, 1, 8, 8)
    m = FeatureMatcher(student, teacher, [("fc1", "fc2", 1.0)], x, torch.device("cpu"))
    try:
        assert isinstance(m.projections[0], torch.nn.Linear) and m.projections[0].weight.shape == (64, 128)
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = m.loss()
        loss.backward()
        assert m.projections[0].weight.grad is not None and student.fc1.weight.grad is not None
        assert all(p.grad is None for p in teacher.parameters())
    finally:
        m.close()
    assert not student.fc1._forward_hooks


def test_bad_feature_layer_names_a_suggestion(tmp_path):
    state = make_state(tmp_path)
    with pytest.raises(StageError, match=r"student has no layer 'conv3'.*conv"):
        run_stage(state, features=[{"student": "conv3", "teacher": "conv2"}], max_steps_per_epoch=1)
    assert all(not m._forward_hooks for m in state.model.modules())


def test_unlabelled_data_with_alpha_one(tmp_path, teacher_ckpt):
    state = make_state(tmp_path, checkpoint=teacher_ckpt)
    x = state.data.train_dataset.tensors[0]
    state.data.train_dataset = TensorDataset(x)  # inputs only
    state.data.labelled = False
    state.model = seeded_zoo("digits_cnn", seed=7)
    run_stage(state, alpha=1.0, epochs=3, lr=0.01)
    assert accuracy(state.model, state) > 0.7  # learnt from the teacher alone
    with pytest.raises(StageError, match="no labels"):
        run_stage(state, alpha=0.5, max_steps_per_epoch=1)
    # garbage labels are never read when alpha is 1 (cross-entropy would reject -1)
    state.data.train_dataset = TensorDataset(x, torch.full((len(x),), -1))
    state.data.labelled = True
    run_stage(state, alpha=1.0, epochs=1, lr=0.01, max_steps_per_epoch=3)
    run_stage(state, alpha=1.0, epochs=1, lr=0.01, max_steps_per_epoch=3, cache_teacher=True)


def test_cached_teacher_logits_train_the_same_model(tmp_path, teacher_ckpt):
    results = []
    for cache in (False, True):
        state = make_state(tmp_path / str(cache), checkpoint=teacher_ckpt, limit_train=256)
        state.model = seeded_zoo("digits_mlp", seed=1)
        torch.manual_seed(0)
        res = run_stage(state, cache_teacher=cache, alpha=0.7, epochs=2, lr=0.01)
        results.append((state.model.state_dict(), res))
    (a, ra), (b, rb) = results
    assert "teacher_cache" in rb.details and rb.details["teacher_cache"]["samples"] == 256
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert ra.details["history"][-1]["train_loss"] == pytest.approx(
        rb.details["history"][-1]["train_loss"], rel=1e-4
    )


def test_teacher_and_student_must_agree_on_classes(tmp_path):
    from compress_cli.sources.models import build_from_source

    state = make_state(tmp_path)
    state.original = build_from_source({"source": "zoo:digits_cnn", "kwargs": {"num_classes": 7}}).eval()
    with pytest.raises(StageError, match=r"teacher outputs \[7\] logits, the student \[10\]"):
        run_stage(state, max_steps_per_epoch=1)


# ------------------------------------------------------------------ validation
def _validate(stage: dict):
    d = tiny_recipe_dict("/tmp/unused", stages=[{"type": "distill", **stage}])
    return validate(parse_yaml(yaml.safe_dump(d), "r.yaml"))


def test_config_shorthands_and_defaults():
    r = _validate({"student": "zoo:digits_cnn", "teacher": "original"})
    cfg = r.stages[0]
    assert cfg.student.source == "zoo:digits_cnn" and cfg.teacher == "original"
    assert (cfg.temperature, cfg.alpha, cfg.cache_teacher, cfg.features) == (4.0, 0.9, False, [])
    assert get_stage("distill").trains(cfg)
    assert _validate({}).stages[0].student == "current"


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"teacher": "zoo:digits_mpl"},
            r"teacher.*unknown zoo model 'digits_mpl' \(did you mean 'digits_mlp'\?\)",
        ),
        ({"teacher": "zoo:digits_cnn"}, r"teacher 'zoo:digits_cnn' has no checkpoint"),
        (
            {
                "student": "zoo:digits_mlp",
                "features": [{"student": "fc1", "teacher": "fc1"}],
                "cache_teacher": True,
            },
            "cache_teacher cannot be combined with features",
        ),
        ({"student": {"source": "zoo:digits_mlp", "input_shape": [1, 8, 8]}}, "student.input_shape"),
        ({"alpha": 1.5}, r"alpha.*less than or equal to 1"),
        ({"temperature": 0}, r"temperature.*greater than 0"),
        ({"features": [{"student": "fc1", "teacher": "fc1", "wieght": 2}]}, "did you mean 'weight'"),
    ],
)
def test_validation_rules(stage, message):
    with pytest.raises(RecipeError, match=message):
        _validate(stage)


def test_preview_describes_without_touching(tmp_path):
    state = make_state(tmp_path)
    cls = get_stage("distill")
    cfg = cls.config_class.model_validate(
        {"type": "distill", "student": "zoo:digits_mlp", "cache_teacher": True}
    )
    before = copy.deepcopy(state.model.state_dict())
    lines = cls(cfg).preview(state)
    assert "NEW zoo:digits_mlp" in lines[0] and "cached" in lines[0]
    assert state.model_spec.source == "zoo:digits_cnn"
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())


@pytest.mark.slow
def test_distill_under_torchrun(tmp_path):
    """Two Gloo processes: student swap with feature matching (projection gradients averaged by
    hand in the loop), then a cached-teacher distillation; rank 0 writes a reloadable student."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tiny_recipe_dict(
        tmp_path,
        model={"source": "zoo:digits_cnn"},
        data={"batch_size": 32},
        measure={"latency": None, "macs": False},
        stages=[
            {"type": "finetune", "epochs": 2, "lr": 0.01},
            {
                "type": "distill",
                "student": {"source": "zoo:digits_resnet", "kwargs": {"width": 8}},
                "epochs": 2,
                "lr": 0.01,
                "features": [{"student": "layer1", "teacher": "relu2"}],
            },
            {"type": "distill", "epochs": 1, "lr": 0.001, "cache_teacher": True},
        ],
    )
    rpath = tmp_path / "ddp.yaml"
    rpath.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "compress_cli",
        "run",
        str(rpath),
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["op"] for e in report["edits"]] == ["replace_model"]
    assert report["final"]["accuracy"] > 0.8
    assert type(compress_cli.load(tmp_path / "out" / "model").layer1[0]).__name__ == "BasicBlock"
