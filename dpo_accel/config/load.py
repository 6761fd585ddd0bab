"""Recipes in: a YAML file (sectioned, or a flat alignment-handbook / TRL recipe), ``--set`` overrides read as
YAML, each key checked against the schema (unknown or mistyped keys name the closest valid one), validated.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Optional, Union

import yaml

from dpo_accel.config.errors import RecipeError, did_you_mean
from dpo_accel.config.schema import Recipe, all_keys, validate

__all__ = ["apply_overrides", "load_recipe", "parse_override", "recipe_from_dict"]


YAML_BOOL_WORDS = {"train.mixed_precision": {False: "no"}}


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, value, a)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if hint is Any:
        return value
    if hint is str and isinstance(value, bool) and value in YAML_BOOL_WORDS.get(path, {}):
        return YAML_BOOL_WORDS[path][value]  # YAML 1.1 reads an unquoted `no` as False
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise RecipeError(f"recipe key '{path}' must be a list, got {type(value).__name__} {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(
            f"recipe key '{path}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str, candidates: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise RecipeError(f"unknown recipe key '{path}'{did_you_mean(path, candidates)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"recipe section '{path}' must be a mapping of keys, got {value!r}")
            kwargs[key] = _build(hint, value, path + ".", candidates)
        else:
            kwargs[key] = _coerce(path, value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.learning_rate=1e-5' -> ('train.learning_rate', 1e-05); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value, e.g. train.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def yaml_kind(value: Any) -> str:
    """How a YAML reader would name `value`'s kind: list, string, number, ..."""
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a YAML mapping of sections (model:, data:, train:, ...), not a "
                          f"{yaml_kind(raw)}")
    keys = all_keys()
    for text in overrides:
        key, value = parse_override(text)
        if key not in keys:
            raise RecipeError(f"unknown recipe key '{key}' in override '{text}'{did_you_mean(key, keys)}")
        section, leaf = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RecipeError(f"recipe section '{section}' must be a mapping of keys")
        raw[section][leaf] = value
    return raw


def recipe_from_dict(raw: Optional[dict]) -> Recipe:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping of sections (model:, data:, train:, ...)")
    return validate(_build(Recipe, raw, "", all_keys()))


def load_recipe(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file '{path}' does not exist; pass --recipe recipes/<name>.yaml")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise RecipeError(f"recipe file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):  # a list or a bare value at the top level
            raise RecipeError(f"recipe file '{path}' must be a YAML mapping of sections (model:, data:, train:, ...), "
                              f"not a {yaml_kind(raw)}; write each section as `name:` at the start of a line")
        from dpo_accel.config.handbook import sectioned

        raw = sectioned(raw, path)  # a flat alignment-handbook / TRL recipe -> our sections, mapping printed
    return recipe_from_dict(apply_overrides(raw, list(overrides or [])))
