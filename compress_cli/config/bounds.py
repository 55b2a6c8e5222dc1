"""The limits recipe numbers share, so every numeric field has a lower and an upper bound.

A value outside them is a typo or a unit mix-up (``lr: 1e3``, ``epochs: 1e6``), refused by
``compress validate`` as one located line instead of running for days or diverging. Each limit is
far beyond any sensible setting; ``tests/test_recipe_bounds.py`` checks that every numeric field of
every recipe model has bounds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: the largest learning rate (a larger one is a typo: training diverges at once)
MAX_LR = 10.0
#: the largest learning rate an lr_find sweep may reach (it looks for divergence on purpose)
MAX_SWEEP_LR = 1e4
#: the most epochs a training stage runs
MAX_EPOCHS = 10_000
#: the largest batch size (samples per step)
MAX_BATCH = 1 << 20
#: the most optimizer steps or batches anything counts
MAX_STEPS = 10**9
#: the longest duration in seconds (a year)
MAX_SECONDS = 366 * 24 * 3600.0
#: the largest regularization weight (weight decay, L1)
MAX_PENALTY = 10.0
#: the largest size of one tensor dimension
MAX_DIM = 1 << 24
#: the most trials, samples or other counts of things
MAX_COUNT = 10**9

#: a learning rate
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]
#: a batch size
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
#: an epoch number (a milestone)
Epoch = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
#: one dimension of a tensor shape
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
#: a position in a tuple (a batch's element, an output's index); negative counts from the end
Position = Annotated[int, Field(ge=-1024, le=1024)]
