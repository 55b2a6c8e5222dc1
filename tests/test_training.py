from __future__ import annotations

import pytest
import torch

from compress_cli.errors import StageError
from compress_cli.testing import tiny_state
from compress_cli.training import TrainOptions, make_optimizer, make_scheduler, train


def opts(**kw) -> TrainOptions:
    return TrainOptions(**{"epochs": 1, "lr": 0.01, **kw})


@pytest.mark.parametrize(
    "sched", ["none", "step", "multistep", "exponential", "cosine", "onecycle", "plateau"]
)
def test_every_scheduler_trains(sched, tmp_path):
    state = tiny_state(tmp_path=tmp_path, limit_train=256)
    res = train(state.model, state, opts(epochs=2, scheduler=sched, milestones=[1], warmup_epochs=0.5))
    assert res.epochs_run == 2
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] * 1.5


def test_warmup_then_cosine_lr_shape():
    model = torch.nn.Linear(2, 2)
    o = opts(epochs=4, scheduler="cosine", warmup_epochs=1, lr=0.1)
    opt = make_optimizer(model.parameters(), o, 0.1)
    sched = make_scheduler(opt, o, 0.1, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001)
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[-1] < 0.01


def test_l1_drives_weights_down(tmp_path):
    a = tiny_state(tmp_path=tmp_path / "a")
    b = tiny_state(tmp_path=tmp_path / "b")
    train(a.model, a, opts(epochs=2))
    train(b.model, b, opts(epochs=2, l1=1e-3))
    l1 = lambda m: sum(p.abs().sum().item() for n, p in m.named_parameters() if n.endswith("weight"))  # noqa: E731
    assert l1(b.model) < 0.9 * l1(a.model)


def test_weight_decay_and_optimizers(tmp_path):
    for name, lr in (("sgd", 0.1), ("adam", 0.01), ("adamw", 0.01)):
        s = tiny_state(tmp_path=tmp_path / name)
        res = train(
            s.model,
            s,
            opts(epochs=2, lr=lr, optimizer=name, weight_decay=1e-4, grad_clip=1.0, label_smoothing=0.1),
        )
        assert res.epochs_run == 2 and res.history[-1]["val_accuracy"] > 0.5, (name, res.history)


def test_nan_loss_is_a_clear_error(tmp_path):
    state = tiny_state(tmp_path=tmp_path)
    with torch.no_grad():
        for p in state.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(StageError, match=r"loss became nan at epoch 1, step 1 .*lower the lr"):
        train(state.model, state, opts())


def test_early_stopping_restores_the_best_weights(tmp_path):
    state = tiny_state(tmp_path=tmp_path)
    seen = []

    def on_epoch(epoch, metrics):
        seen.append((metrics["val_accuracy"], {k: v.clone() for k, v in state.model.state_dict().items()}))

    # a huge lr after the first epoch makes validation accuracy fall
    res = train(
        state.model,
        state,
        opts(epochs=6, optimizer="sgd", lr=0.05, scheduler="exponential", gamma=1.0, early_stopping=1),
        on_epoch=on_epoch,
    )
    best_acc, best_sd = max(seen, key=lambda t: t[0])
    assert res.best_val_accuracy == best_acc
    if res.stopped_early:
        for k, v in state.model.state_dict().items():
            assert torch.equal(v, best_sd[k])


def test_zero_epochs_is_a_noop(tmp_path):
    state = tiny_state(tmp_path=tmp_path)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    train(state.model, state, opts(epochs=0))
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())


def test_auto_lr_resolves_from_hparams(tmp_path):
    state = tiny_state(tmp_path=tmp_path)
    state.hparams["lr"] = 0.003
    res = train(state.model, state, opts(lr="auto"))
    assert res.history[0]["lr"] == pytest.approx(0.003)
    state.hparams.clear()
    with pytest.raises(StageError, match="'auto' but no earlier stage"):
        train(state.model, state, opts(lr="auto"))
