"""Recipes as plain data: parse the string, list and TOML forms into one ``Recipe`` value."""

from .recipe import PLANNED_PASSES, FrozenDict, Recipe

__all__ = ["Recipe", "FrozenDict", "PLANNED_PASSES"]
