"""Where models and data come from: model sources, dataset sources, the built-in model zoo."""

from compress_cli.config.source_checks import register_source_check

#: names of the built-in zoo networks (kept here so recipe validation needs no torch import;
#: a test checks it matches sources.zoo.ZOO)
ZOO_NAMES = ("digits_mlp", "digits_cnn", "digits_resnet", "lenet5", "fashion_cnn", "fashion_cnn_small")


def check_model_source(source: str) -> str | None:
    """A problem with the ``model.source`` string, or None. Cheap: imports nothing heavy."""
    from pathlib import Path

    from compress_cli.errors import did_you_mean

    kind, sep, name = source.partition(":")
    if kind == "zoo":
        return None if name in ZOO_NAMES else f"unknown zoo model {name!r}{did_you_mean(name, ZOO_NAMES)}"
    if kind == "torchvision":
        return None if name else "torchvision: needs a model name, e.g. torchvision:resnet18"
    if sep:
        if kind and name and all(p.isidentifier() for p in kind.split(".")) and name.isidentifier():
            return None
        return f"expected zoo:NAME, torchvision:NAME or package.module:callable (got {source!r})"
    if (Path(source) / "manifest.json").is_file():
        return None
    return f"expected zoo:NAME, torchvision:NAME, package.module:callable or a compressed model directory (got {source!r})"


def _check_data_source(source: str) -> str | None:
    from compress_cli.sources.data import check_source  # numpy: only when a data.source is validated

    return check_source(source)


register_source_check("model", check_model_source)
register_source_check("data", _check_data_source)
