"""Running a recipe: ``run`` (the stage loop, ``run_recipe``), ``setup`` (device, seeds, output,
State, preflight), ``stage_run`` (one stage, the same for every loop), ``snapshots`` (resume and
revert), ``guards`` (limits and warn/revert/fail), ``signals`` (SIGINT/SIGTERM and the time budget)
and ``distributed`` (the other torchrun ranks)."""
