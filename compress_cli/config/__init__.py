"""What users write: the recipe models, YAML with line numbers, validation into located problems.

The lowest layer with the package's own types: torch-free, and it imports nothing from stages or
sources. What validation needs from above comes in without an upward import: the stage classes are
passed to :func:`~compress_cli.config.validation.recipe_from_raw` (``compress_cli.stages.registry``
does it), and the sources package registers its source-string checks in
:mod:`compress_cli.config.source_checks`.
"""
