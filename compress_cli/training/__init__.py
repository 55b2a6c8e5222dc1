"""THE training loop. finetune, distill, QAT, pruning schedules and HPO trials all call ``train``.

Options every training stage shares live in ``TrainOptions`` (a pydantic mixin for stage configs):
optimizer, lr (or ``auto``), schedules with warm-up, weight decay and L1, label smoothing, gradient
clipping, early stopping on validation accuracy (restores the best weights), AMP on CUDA.

Mid-stage checkpoints: inside a pipeline stage, ``train`` writes everything it needs to continue
(model, optimizer, schedulers, AMP scaler, RNG states, counters, early-stopping state, the training
loader's shuffle state and the batches consumed) to ``STAGE_DIR/train/NN.pt`` at the end of every
epoch, every ``checkpoint_every_s`` seconds within one, and when a signal stops it; a stage resumed
with ``--resume`` re-runs its code, and each ``train`` call continues from its checkpoint (or, when
it had finished, returns what it returned then). On CPU with ``num_workers: 0`` the resumed run is
bit-equal to an uninterrupted one.
"""

from compress_cli.training.loop import train
from compress_cli.training.options import (
    TrainOptions,
    TrainResult,
    l1_penalty,
    make_optimizer,
    make_scheduler,
)

__all__ = ["TrainOptions", "TrainResult", "l1_penalty", "make_optimizer", "make_scheduler", "train"]
