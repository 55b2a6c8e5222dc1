"""Where models and data come from: the model-source grammar (``spec``), model sources and
checkpoints (``models``), the built-in model zoo (``zoo``), dataset sources (``data``)."""

from compress_cli.config.source_checks import register_source_check
from compress_cli.sources.spec import check_model_source


def _check_data_source(source: str) -> str | None:
    from compress_cli.sources.data import check_source  # only when a data.source is validated

    return check_source(source)


register_source_check("model", check_model_source)
register_source_check("data", _check_data_source)
