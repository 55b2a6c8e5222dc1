"""Leaf helpers: they import nothing from the rest of the package."""
