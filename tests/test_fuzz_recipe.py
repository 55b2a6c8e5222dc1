"""Property test: whatever the recipe text, the loader raises nothing but the tool's own error."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress_cli.config.yaml import apply_overrides, parse_yaml
from compress_cli.errors import CompressError
from compress_cli.stages.registry import validate

KEYS = [
    "version",
    "name",
    "seed",
    "device",
    "model",
    "data",
    "measure",
    "guard",
    "stages",
    "output",
    "type",
    "source",
    "epochs",
    "lr",
    "sparsity",
    "batch_size",
    "latency",
    "batch_sizes",
    "checkpoint",
    "kwargs",
    "on_violation",
    "time_budget_s",
    "scheduler",
    "optimizer",
    "zzz",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "finetune", "evaluate", "zoo:digits_mlp", "digits", "cpu"]),
)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.sampled_from(KEYS), kids, max_size=5)
    ),
    max_leaves=20,
)


def load(text: str, overrides=()) -> None:
    try:
        raw = parse_yaml(text, "fuzz.yaml")
        apply_overrides(raw, list(overrides))
        validate(raw)
    except CompressError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_structured_garbage(d):
    load(yaml.safe_dump(d))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_text_garbage(text):
    load(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=3))
def test_override_garbage(overrides):
    load("version: 1\nname: x\nmodel: {source: zoo:digits_mlp}\nstages: [{type: evaluate}]\n", overrides)
