"""Mid-stage checkpoints of ``training.train``: a training call killed at the end of an epoch, in
the middle of one, or after it finished, then run again in a fresh state (what ``--resume`` does),
ends bit-equal to an uninterrupted call (CPU, ``num_workers: 0``: the weights, the optimizer's
moments and the per-epoch history compare equal with ``torch.equal`` / ``==``, not approximately)."""

from __future__ import annotations

import pytest
import torch

from compress_cli.state import TRAIN_CHECKPOINTS
from compress_cli.testing import tiny_state
from compress_cli.training import TrainOptions, checkpoints, train


class Killed(Exception):
    """Stands for SIGKILL: raised from inside ``train``, nothing after it runs."""


def opts(**kw) -> TrainOptions:
    return TrainOptions(**{"epochs": 4, "lr": 0.01, **kw})


def stage_state(tmp_path, key: str = "1-abc"):
    """A fresh process's state for a stage whose snapshot folder is ``tmp_path/stage``."""
    state = tiny_state(tmp_path=tmp_path / "run", limit_train=256)
    state.ctx.stage_dir, state.ctx.stage_key = tmp_path / "stage", key
    return state


def run(state, o: TrainOptions, calls: int = 1):
    """What a stage does: seeded at its start (as run_stage does), then ``calls`` train calls."""
    torch.manual_seed(0)
    return [train(state.model, state, o, label=f"t{n}") for n in range(calls)]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def reference(tmp_path, o: TrainOptions, calls: int = 1):
    state = tiny_state(tmp_path=tmp_path / "ref", limit_train=256)  # no stage: no checkpoints
    return state, run(state, o, calls)


def test_uninterrupted_call_leaves_a_finished_checkpoint_and_trains_the_same(tmp_path):
    ref, ref_res = reference(tmp_path, opts())
    state = stage_state(tmp_path)
    res = run(state, opts())
    assert same_weights(ref.model, state.model) and res[0].history == ref_res[0].history
    saved = torch.load(tmp_path / "stage" / TRAIN_CHECKPOINTS / "00.pt", weights_only=True)
    assert saved["done"] is True and saved["result"]["epochs_run"] == 4


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"optimizer": "sgd", "scheduler": "onecycle", "lr": 0.05},
        {"scheduler": "cosine", "warmup_epochs": 0.5},
        {"scheduler": "plateau", "early_stopping": 2, "epochs": 6},
        {"optimizer": "adamw", "scheduler": "step", "weight_decay": 1e-3, "grad_clip": 1.0},
    ],
    ids=["adam", "sgd-onecycle", "warmup-cosine", "plateau-early-stopping", "adamw-step-clip"],
)
def test_killed_after_an_epoch_then_resumed_is_bit_equal(tmp_path, over):
    o = opts(**over)
    ref, ref_res = reference(tmp_path, o)
    state = stage_state(tmp_path)

    def kill(epoch, _metrics):
        if epoch == 1:  # before epoch 2's checkpoint: the run resumes from the end of epoch 1
            raise Killed

    state.ctx.epoch_callbacks.append(kill)
    with pytest.raises(Killed):
        run(state, o)
    saved = torch.load(tmp_path / "stage" / TRAIN_CHECKPOINTS / "00.pt", weights_only=True)
    assert (saved["done"], saved["epoch"], saved["consumed"]) == (False, 1, 0)

    resumed = stage_state(tmp_path)
    res = run(resumed, o)
    assert same_weights(ref.model, resumed.model)
    assert res[0].history == ref_res[0].history
    assert (res[0].epochs_run, res[0].stopped_early) == (ref_res[0].epochs_run, ref_res[0].stopped_early)


def test_killed_mid_epoch_then_resumed_skips_the_consumed_batches(tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setattr(checkpoints, "_clock", lambda: float(next(ticks)))  # one second per look
    o = opts(epochs=3, checkpoint_every_s=3)
    ref, ref_res = reference(tmp_path, o)
    state = stage_state(tmp_path)
    real_save, saves = checkpoints.TrainCheckpoint.save, []

    def save_then_die(self, payload):
        real_save(self, payload)
        saves.append((payload["epoch"], payload["consumed"]))
        if payload["epoch"] == 1 and payload["consumed"]:  # inside the second epoch (its own shuffle)
            raise Killed

    monkeypatch.setattr(checkpoints.TrainCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(state, o)
    assert (0, 0) not in saves and (1, 0) in saves  # mid-epoch saves, the end of epoch 1's
    steps = len(stage_state(tmp_path / "x").data.loader("train"))
    assert 0 < saves[-1][1] < steps, saves
    monkeypatch.setattr(checkpoints.TrainCheckpoint, "save", real_save)

    resumed = stage_state(tmp_path)
    res = run(resumed, o)
    assert same_weights(ref.model, resumed.model)
    assert res[0].history == ref_res[0].history


def test_a_finished_call_is_not_trained_again_and_the_next_one_resumes(tmp_path):
    o = opts(epochs=2)
    ref, ref_res = reference(tmp_path, o, calls=2)
    state = stage_state(tmp_path)
    state.ctx.epoch_callbacks.append(lambda e, m: None)
    calls = []

    def kill(epoch, _metrics):
        calls.append(epoch)
        if len(calls) == 3:  # the second call's first epoch
            raise Killed

    state.ctx.epoch_callbacks.append(kill)
    with pytest.raises(Killed):
        run(state, o, calls=2)
    resumed = stage_state(tmp_path)
    seen = []
    resumed.ctx.epoch_callbacks.append(lambda e, m: seen.append(e))
    res = run(resumed, o, calls=2)
    assert seen == [0, 1]  # only the second call trained, both its epochs (killed before epoch 1's save)
    assert same_weights(ref.model, resumed.model)
    assert [r.history for r in res] == [r.history for r in ref_res]


def test_a_checkpoint_of_another_config_is_ignored_and_removed(tmp_path):
    state = stage_state(tmp_path)
    run(state, opts(epochs=2), calls=2)
    folder = tmp_path / "stage" / TRAIN_CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["00.pt", "01.pt"]
    changed = opts(epochs=2, lr=0.02)
    ref, ref_res = reference(tmp_path, changed)
    other = stage_state(tmp_path)  # same stage key: train's own options changed
    res = run(other, changed)
    assert same_weights(ref.model, other.model) and res[0].history == ref_res[0].history
    assert sorted(p.name for p in folder.iterdir()) == ["00.pt"]  # the stale second call's file went
    third = stage_state(tmp_path, key="1-other")  # the engine's key changed (recipe or stage config)
    seen = []
    third.ctx.epoch_callbacks.append(lambda e, m: seen.append(e))
    run(third, changed)
    assert seen == [0, 1]


def test_a_signal_writes_the_position_not_a_finished_call(tmp_path):
    state = stage_state(tmp_path)

    class StopAfter:
        def __init__(self):
            self.n = 0

        def should_stop(self):
            self.n += 1
            return self.n > 2

    state.ctx.stop = StopAfter()
    res = run(state, opts())
    assert res[0].stopped_early
    saved = torch.load(tmp_path / "stage" / TRAIN_CHECKPOINTS / "00.pt", weights_only=True)
    assert (saved["done"], saved["epoch"], saved["consumed"]) == (False, 0, 3)


def test_checkpoint_every_s_is_bounded():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainOptions(checkpoint_every_s=0)
    with pytest.raises(ValueError, match="less than or equal to 86400"):
        TrainOptions(checkpoint_every_s=86401)


def test_trials_do_not_checkpoint(tmp_path):
    state = stage_state(tmp_path)
    trial = state.ctx.for_trial(tmp_path / "trial", state.ctx.listener)
    assert trial.next_train_checkpoint() is None
    assert state.ctx.next_train_checkpoint() == (tmp_path / "stage" / "train" / "00.pt", "1-abc/0")


def test_after_a_signal_the_later_calls_positions_are_dropped(tmp_path):
    """SIGTERM in the first of two calls: the stage goes on, its second call stops after one step
    and leaves a checkpoint; the resumed first call continues, and the second starts over."""
    o = opts(epochs=2)
    ref, ref_res = reference(tmp_path, o, calls=2)
    state = stage_state(tmp_path)

    class StopAfter:
        n = 0

        def should_stop(self):
            self.n += 1
            return self.n > 2

    state.ctx.stop = StopAfter()
    run(state, o, calls=2)
    folder = tmp_path / "stage" / TRAIN_CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["00.pt", "01.pt"]
    resumed = stage_state(tmp_path)
    res = run(resumed, o, calls=2)
    assert same_weights(ref.model, resumed.model)
    assert [r.history for r in res] == [r.history for r in ref_res]


def test_changing_checkpoint_every_s_keeps_the_checkpoint(tmp_path):
    ref, ref_res = reference(tmp_path, opts())
    state = stage_state(tmp_path)

    def kill(epoch, _metrics):
        if epoch == 2:
            raise Killed

    state.ctx.epoch_callbacks.append(kill)
    with pytest.raises(Killed):
        run(state, opts())
    resumed = stage_state(tmp_path)
    seen = []
    resumed.ctx.epoch_callbacks.append(lambda e, m: seen.append(e))
    res = run(resumed, opts(checkpoint_every_s=5))
    assert seen == [2, 3]
    assert same_weights(ref.model, resumed.model) and res[0].history == ref_res[0].history


def test_stage_key_ignores_checkpoint_every_s_at_any_depth():
    import yaml

    from compress_cli.config.yaml import parse_yaml
    from compress_cli.engine.snapshots import stage_key
    from compress_cli.stages.registry import validate
    from compress_cli.testing import tiny_recipe_dict

    def key(every: float, lr: float = 0.01) -> str:
        schedule = {"steps": 2, "lr": lr, "checkpoint_every_s": every}
        d = tiny_recipe_dict("/tmp", stages=[{"type": "prune", "sparsity": 0.5, "schedule": schedule}])
        return stage_key(validate(parse_yaml(yaml.safe_dump(d))), 1)

    assert key(5) == key(600) != key(5, lr=0.02)


def test_disk_full_writing_a_checkpoint_is_the_output_line_and_keeps_the_last(tmp_path, monkeypatch):
    """ENOSPC on the second checkpoint of a finetune: exit 1 with the run's one output line, the
    first checkpoint intact; --resume, with space again, continues from it."""
    import errno
    import os

    import yaml
    from typer.testing import CliRunner

    from compress_cli._utils import io
    from compress_cli.cli import app
    from compress_cli.testing import tiny_recipe_dict

    real, writes = io.os.fsync, []

    def fsync(fd):
        if f"01-finetune{os.sep}train{os.sep}" in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    stages = [{"type": "finetune", "epochs": 3, "lr": 0.01, "max_steps_per_epoch": 3}]
    d = tiny_recipe_dict(tmp_path, stages=stages, measure={"latency": None})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    monkeypatch.setattr(io.os, "fsync", fsync)
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: output {out}: No space left on device while writing stages/01-finetune"]
    folder = out / "stages" / "01-finetune" / TRAIN_CHECKPOINTS
    assert [p.name for p in folder.iterdir()] == ["00.pt"]  # no temporary file left either
    assert torch.load(folder / "00.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(io.os, "fsync", real)
    res = CliRunner().invoke(app, ["run", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    assert "finetune: resuming at epoch 2" in res.output
