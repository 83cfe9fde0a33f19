"""Helpers shared by the config tests."""

from pathlib import Path

import yaml


def load(path: Path) -> dict:
    """A YAML config as a dict."""
    return yaml.safe_load(path.read_text())


def strings(node):
    """Every string value of a nested config."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node
