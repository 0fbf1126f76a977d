"""Every shipped config in configs/ parses with its recipe's flags (a typo would otherwise surface on a cluster)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from minilora.cli import parse_with_config

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path):
    recipe = _recipe("train_dapt" if path.name.startswith("dapt") else "train_task")
    args = parse_with_config(recipe.build_parser(), ["--config", str(path)])
    assert args.model.startswith("/path/to/") and args.out.startswith("runs/")
    args = parse_with_config(recipe.build_parser(), ["--config", str(path), "--lr", "1e-5"])
    assert args.lr == 1e-5


@pytest.mark.parametrize("name", ["train_dapt", "train_task", "eval"])
def test_every_flag_says_what_it_does_and_its_default(name):
    """``--help`` explains every flag, and a flag whose default is a value (not None or off) states it."""
    parser = _recipe(name).build_parser()
    for action in parser._actions:
        flag = "/".join(action.option_strings) or action.dest
        if action.dest in ("help", "config"):
            continue
        assert action.help, f"{name} {flag}: no help text"
        if action.option_strings and action.default not in (None, False):
            text = parser._get_formatter()._expand_help(action)
            assert "default" in text and str(action.default).rstrip("0").rstrip(".") in text, (name, flag, text)
