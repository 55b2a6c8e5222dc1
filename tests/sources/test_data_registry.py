"""The data-source registry: one grammar for validation (check_source) and dispatch (build_data)."""

from __future__ import annotations

import pytest

from compress_cli.sources.data import check_source
from compress_cli.sources.data.registry import names, parse, register_source


def test_every_source_kind_is_registered_once():
    assert sorted(names()) == sorted(
        [
            "digits",
            "synthetic",
            "mnist",
            "fashion_mnist",
            "imagefolder",
            "text",
            "hf_datasets",
            "torchvision:NAME",
            "package.module:callable",
        ]
    )


@pytest.mark.parametrize(
    ("source", "usage", "argument"),
    [
        ("digits", "digits", ""),
        ("torchvision:CIFAR10", "torchvision:NAME", "CIFAR10"),
        ("pkg.mod:make", "package.module:callable", "pkg.mod:make"),
        ("digits:make", "package.module:callable", "digits:make"),  # a module named digits
    ],
)
def test_parse_gives_the_builder_check_source_accepted(source, usage, argument):
    assert check_source(source) is None
    entry, arg = parse(source)
    assert (entry.usage, arg) == (usage, argument)


def test_a_name_cannot_be_registered_twice_nor_two_fallbacks():
    with pytest.raises(ValueError, match="'digits' is registered twice"):
        register_source("digits")(lambda *a: None)
    with pytest.raises(ValueError, match="only one data source can be the fallback"):
        register_source("other.module:callable", fallback=True)(lambda *a: None)
