"""Measurements that find training hyper-parameters by running real training steps: the lr range
test (:mod:`~compress_cli.tuning.lr_range`, the ``lr_find`` stage) and the batch-size probe
(:mod:`~compress_cli.tuning.batch_size`, the ``batch_size_find`` stage). Both put the model back
exactly as it was (:func:`preserved`), so the stages leave only their findings in ``state.hparams``.
Importing this package does not import torch.
"""

from compress_cli.tuning._restore import preserved
from compress_cli.tuning.batch_size import (
    Probe,
    apply_margin,
    optimizer_state_factor,
    pick_throughput,
    probe_batch,
    search_max_batch,
)
from compress_cli.tuning.lr_range import (
    LrSuggestion,
    LrSweep,
    downsample,
    lr_schedule,
    plot_lr_curve,
    run_lr_sweep,
    smooth,
    suggest_lr,
)

__all__ = [
    "LrSuggestion",
    "LrSweep",
    "Probe",
    "apply_margin",
    "downsample",
    "lr_schedule",
    "optimizer_state_factor",
    "pick_throughput",
    "plot_lr_curve",
    "preserved",
    "probe_batch",
    "run_lr_sweep",
    "search_max_batch",
    "smooth",
    "suggest_lr",
]
