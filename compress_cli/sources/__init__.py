"""Where models and data come from: the model-source grammar (``spec``), model sources and
checkpoints (``models``), the built-in model zoo (``zoo``), dataset sources (``data``)."""
