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


def test_a_switch_set_by_a_config_is_turned_off_by_its_opposite_flag(tmp_path):
    """Before: a switch a shared config set (grad_checkpointing, no_packing) could not be undone on the command line."""
    dapt, task = _recipe("train_dapt"), _recipe("train_task")
    cfg = tmp_path / "c.toml"
    cfg.write_text("grad_checkpointing = true\nno_packing = true\n")
    on = parse_with_config(dapt.build_parser(), ["--config", str(cfg)])
    assert on.grad_checkpointing and on.no_packing
    off = parse_with_config(dapt.build_parser(), ["--config", str(cfg), "--no-grad-checkpointing", "--packing"])
    assert not off.grad_checkpointing and not off.no_packing
    plain = parse_with_config(dapt.build_parser(), ["--no-grad-checkpointing"])
    assert plain.grad_checkpointing is False and plain.no_packing is False
    cfg.write_text("multilabel = true\nno_domain_adapter = true\n")
    args = parse_with_config(task.build_parser(), ["--config", str(cfg), "--no-multilabel"])
    assert not args.multilabel and args.no_domain_adapter  # --domain-adapter DIR is another flag: no opposite
    parser = dapt.build_parser()
    parse_with_config(parser, [])
    assert "--no-grad-checkpointing" not in parser.format_help() and "--packing " not in parser.format_help()
