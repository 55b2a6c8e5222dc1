"""What users write: the recipe models, YAML with line numbers, validation into located problems.

The lowest layer with the package's own types: torch-free, and it imports nothing from stages or
sources. What validation needs from above (the installed stages, the source-string checks) is passed
in as a :class:`~compress_cli.config.catalog.Catalog`; ``compress_cli.stages.registry`` builds it.
"""
