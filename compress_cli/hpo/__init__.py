"""Hyperparameter search with Optuna, the library behind the ``hpo`` stage: ``space`` (objectives,
distributions, space keys; torch- and optuna-free), ``search`` (the study, its trials, the best
one kept), ``trial`` (one trial's generators, progress and pruner callback), ``storage`` (where the
study lives, samplers, pruners) and ``table`` (the trial table)."""
