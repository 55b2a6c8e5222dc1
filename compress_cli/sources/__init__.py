"""Where models and data come from: model sources, dataset sources, the built-in model zoo."""
