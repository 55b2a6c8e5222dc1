"""Pruning algorithms as a library (the ``prune``, ``prune_channels`` and ``drop_layers`` stages are
thin adapters over it):

- :mod:`~compress_cli.pruning.unstructured`: magnitude masks through ``torch.nn.utils.prune``
  (global or per layer, cubic schedule), and :func:`make_permanent`, the one way to turn masks
  into plain weights before a model is rebuilt, converted or traced;
- :mod:`~compress_cli.pruning.sensitivity`: per-layer sensitivity scan and sparsity allocation;
- :mod:`~compress_cli.pruning.channels`: channel/neuron removal with torch-pruning;
- :mod:`~compress_cli.pruning.layers`: removal of whole residual blocks and layers;
- :mod:`~compress_cli.pruning.exactness`: the proof every structural removal passes before it is
  kept (the edited model against a zeroed or bypassed reference, first diverging layer named).
"""

from compress_cli.pruning.channels import (
    IMPORTANCES,
    ChannelPruneResult,
    attention_heads,
    high_rank_reshapes,
    layer_widths,
    prune_channels,
)
from compress_cli.pruning.exactness import ABS_TOL, CHECK_SAMPLES, REL_TOL, Exactness
from compress_cli.pruning.layers import (
    Candidate,
    choose,
    drop_layers,
    find_candidates,
    score_candidates,
    unsaveable_note,
)
from compress_cli.pruning.sensitivity import SensitivityScan, allocate, scan_sensitivity
from compress_cli.pruning.unstructured import (
    PRUNABLE,
    Group,
    apply_masks,
    cubic_schedule,
    effective_weight,
    find_head,
    is_pruned,
    layer_sparsity,
    make_permanent,
    mask_zeros,
    masks,
    match_overrides,
    permanent_copy,
    prune_global,
    prune_layer,
    select_targets,
    summary,
)

__all__ = [
    "ABS_TOL",
    "CHECK_SAMPLES",
    "REL_TOL",
    "Exactness",
    "attention_heads",
    "IMPORTANCES",
    "PRUNABLE",
    "Candidate",
    "ChannelPruneResult",
    "Group",
    "SensitivityScan",
    "allocate",
    "apply_masks",
    "choose",
    "cubic_schedule",
    "drop_layers",
    "effective_weight",
    "find_candidates",
    "unsaveable_note",
    "find_head",
    "high_rank_reshapes",
    "is_pruned",
    "layer_sparsity",
    "layer_widths",
    "make_permanent",
    "mask_zeros",
    "masks",
    "match_overrides",
    "permanent_copy",
    "prune_channels",
    "prune_global",
    "prune_layer",
    "scan_sensitivity",
    "score_candidates",
    "select_targets",
    "summary",
]
