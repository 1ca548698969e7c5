"""Recipes: the paper's hyperparameters per size as data (``recipes/<size>.toml``).

A recipe's tables are ``TrainConfig``'s sections and its keys the flags' ``dest`` names::

    [optimizer]
    lr = 6e-3

``pretrain_cola.py --config recipes/60m.toml`` makes the recipe's values the parser's defaults, so every
flag given on the command line overrides them. The ``[launcher]`` table is read by
``megatron_cola/launch.py`` only (defaults of the environment knobs). An unknown table or key, or a value
of the wrong type, is a ``ConfigError`` naming it. Reads only TOML: no torch, so the launchers stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (setup.py requires it there)
    import tomli as tomllib

from megatron_cola.errors import ConfigError
from megatron_cola.training.train_config import FLAG_SECTIONS, flag_kwargs

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""The recipes of the checkout (``recipes/<size>.toml``)."""

#: Keys of a recipe's ``[launcher]`` table and their types (see ``megatron_cola/launch.py``).
LAUNCHER_KEYS: dict[str, type] = {
    "save_interval": int,
    "gpus_per_node": int,
    "data_path": str,
    "tokenizer_model": str,
    "save_dir": str,
    "warmup_fraction": float,
}

#: Flags a ``--deepspeed_config`` file owns: with one, the recipe's values of these are not applied.
DS_CONFIG_OWNS = ("zero_stage", "clip_grad")


def recipe_path(size: str) -> Path:
    """``recipes/<size>.toml`` of the checkout (``size`` case-insensitive)."""
    path = RECIPE_DIR / f"{size.lower()}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
        raise ConfigError(f"no recipe for size {size!r}: {path} does not exist; recipes: {known}")
    return path


def read_recipe(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The recipe's tables, with every table and key checked (``ConfigError`` naming the first bad one)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file (the recipes are in {RECIPE_DIR})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None
    for table, values in data.items():
        if not isinstance(values, dict) or (table not in FLAG_SECTIONS and table != "launcher"):
            raise ConfigError(
                f"{path}: unknown table [{table}]; allowed: {[*FLAG_SECTIONS, 'launcher']} "
                "(every value lives in one of these tables)"
            )
        for key, value in values.items():
            _check_value(path, table, key, value)
    return data


def recipe_defaults(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe's flag values, flat by ``dest`` (the ``[launcher]`` table left out)."""
    flat: dict[str, Any] = {}
    for table, values in read_recipe(path).items():
        if table == "launcher":
            continue
        for key, value in values.items():
            flat[key] = value.split() if key == "data_path" and isinstance(value, str) else value
    return flat


def apply_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make ``--config FILE``'s values (if ``argv`` has one) the defaults of ``parser``."""
    given = parser.parse_args(argv)
    if not given.config:
        return
    defaults = recipe_defaults(given.config)
    if given.deepspeed_config:  # ZeRO stage and clipping come from the DeepSpeed config then
        for key in DS_CONFIG_OWNS:
            defaults.pop(key, None)
    parser.set_defaults(**defaults)


# ------------------------------------------------------------------------------------------ checks
def _fields(table: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(FLAG_SECTIONS[table])}


def _check_value(path: Any, table: str, key: str, value: Any) -> None:
    where = f"{path}: [{table}] {key}"
    if table == "launcher":
        if key not in LAUNCHER_KEYS:
            raise ConfigError(f"{where}: unknown key; [launcher] allows {sorted(LAUNCHER_KEYS)}")
        _check_type(where, value, LAUNCHER_KEYS[key])
        return
    fields = _fields(table)
    if key not in fields:
        home = next((s for s in FLAG_SECTIONS if key in _fields(s)), None)
        hint = (
            f"it belongs in [{home}]"
            if home
            else f"[{table}] allows {sorted(fields)}; keys are flag names with _ (--lr-warmup-iters: "
            "lr_warmup_iters)"
        )
        raise ConfigError(f"{where}: unknown key; {hint}")
    _, kw = flag_kwargs(fields[key])
    if key == "data_path":
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ConfigError(f"{where} must be a string or a list of strings, got {value!r}")
        return
    action = kw.get("action")
    if action is not None:  # store_true / BooleanOptionalAction
        _check_type(where, value, bool)
        return
    _check_type(where, value, kw.get("type") or str)
    choices = kw.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r}: allowed {list(choices)}")


def _check_type(where: str, value: Any, kind: type) -> None:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where} = {value!r}: expected a {kind.__name__}")
