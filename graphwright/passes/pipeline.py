"""Run a recipe's passes over a step graph (placeholder until the recipe machinery lands)."""

from __future__ import annotations


def run_recipe(sg, recipe, model=None, tokenizer=None, verify=True):
    if recipe not in (None, "", []):
        raise NotImplementedError("recipes land with the recipes issue")
    return sg, None, {}
