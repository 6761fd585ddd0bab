"""Behaviour scorers: what the policy's held-out answers say, as named rates (``eval.behaviour``).

The preference metrics (reward accuracy, margin) are read off the preference data; a scorer reads the
answers the model generates, so a before/after table shows what training changed in what it says.

``eval.behaviour`` names one scorer:

  (unset)       mean_answer_words only
  arith         the shipped addition task: format_rate, correct_rate (dpo_accel.data.tasks.arith)
  geo           the shipped one-word geography task: format_rate, correct_rate (dpo_accel.data.tasks.geo)
  shapes        the shipped image task: format_rate, correct_rate against each held-out row's chosen answer
                (dpo_accel.data.tasks.shapes)
  exact_match   exact_match_rate: the answer equals the row's chosen answer (whitespace-trimmed)
  regex         regex_match_rate: the whole answer matches ``eval.behaviour_regex``
  length        mean_answer_words, mean_answer_chars
  module:func   your callable ``func(prompts, answers)`` or ``func(prompts, answers, rows)`` returning
                {name: number}; ``module`` is an importable module or a path to a ``.py`` file

A scorer sees one answer per generation (``eval.num_return_sequences`` answers per prompt, the prompt
and its row repeated); every result also holds ``mean_answer_words`` and ``n``. A failing scorer
raises `ScorerError`, one line naming it.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
from typing import Callable, Optional

from dpo_accel.config.errors import RecipeError


class ScorerError(RecipeError):
    """A behaviour scorer that cannot be found, cannot run or returns something that is not a score."""


def _answer_text(value) -> str:
    """A row's answer as text: a string, or the last message's content of a conversation."""
    if isinstance(value, list):
        return str(value[-1]["content"]) if value else ""
    return str(value)


def _needs_rows(name: str, rows: Optional[list], n: int) -> list:
    if rows is None or len(rows) != n:
        raise ScorerError(f"behaviour scorer '{name}' needs the held-out rows, one per answer "
                          f"(got {'none' if rows is None else len(rows)} for {n} answers)")
    return rows


def length_scores(prompts: list, answers: list[str]) -> dict:
    n = max(len(answers), 1)
    return {"mean_answer_words": sum(len(a.split()) for a in answers) / n,
            "mean_answer_chars": sum(len(a) for a in answers) / n}


def exact_match_scores(prompts: list, answers: list[str], rows: list) -> dict:
    rows = _needs_rows("exact_match", rows, len(answers))
    hits = [a.strip() == _answer_text(r["chosen"]).strip() for a, r in zip(answers, rows)]
    return {"exact_match_rate": sum(hits) / max(len(hits), 1)}


def regex_scorer(pattern: Optional[str]) -> Callable:
    """A scorer counting answers that match `pattern` in full (``re.fullmatch``, after trimming)."""
    if not pattern:
        raise ScorerError("behaviour scorer 'regex' needs eval.behaviour_regex, e.g. '[A-Z][a-z]+\\.?'")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ScorerError(f"behaviour scorer 'regex': eval.behaviour_regex {pattern!r} is not a valid "
                          f"regular expression ({e})") from None

    def regex_scores(prompts: list, answers: list[str]) -> dict:
        hits = [compiled.fullmatch(a.strip()) is not None for a in answers]
        return {"regex_match_rate": sum(hits) / max(len(hits), 1)}

    return regex_scores


def _arith(prompts: list, answers: list[str]) -> dict:
    from dpo_accel.data.tasks.arith import behaviour_summary

    return behaviour_summary(prompts, answers)


def _geo(prompts: list, answers: list[str]) -> dict:
    from dpo_accel.data.tasks.geo import behaviour_summary

    return behaviour_summary(prompts, answers)


def _shapes(prompts: list, answers: list[str], rows: list) -> dict:
    from dpo_accel.data.tasks.shapes import behaviour_summary

    return behaviour_summary(answers, _needs_rows("shapes", rows, len(answers)))


BUILTIN = {"arith": _arith, "geo": _geo, "shapes": _shapes, "exact_match": exact_match_scores, "length": length_scores}
NAMES = ("arith", "geo", "shapes", "exact_match", "regex", "length", "module:function")


def import_callable(spec: str) -> Callable:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ScorerError(f"eval.behaviour '{spec}' is not a scorer; choose one of: {', '.join(NAMES)}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ScorerError(f"behaviour scorer '{spec}': file '{module_name}' does not exist")
            loaded = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ScorerError:
        raise
    except Exception as e:  # an import error of the user's module, whatever it is
        raise ScorerError(f"behaviour scorer '{spec}': cannot import '{module_name}' "
                          f"({type(e).__name__}: {e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ScorerError(f"behaviour scorer '{spec}': '{module_name}' has no function '{func_name}'")
    return func


def _wants_rows(func: Callable) -> bool:
    """True when `func` takes a third positional argument (or `rows`): it is then given the rows."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params) or any(
        p.name == "rows" for p in params)


def resolve_scorer(name: Optional[str], regex: Optional[str] = None) -> Callable:
    """`name` -> a callable ``(prompts, answers, rows) -> dict``; raises ScorerError at once (before any
    compute) when the name, the module or the pattern is wrong."""
    if not name:
        func = length_scores
    elif name == "regex":
        func = regex_scorer(regex)
    elif name in BUILTIN:
        func = BUILTIN[name]
    elif ":" in name:
        func = import_callable(name)
    else:
        raise ScorerError(f"eval.behaviour '{name}' is not a scorer; choose one of: {', '.join(NAMES)}")
    label = name or "length"
    with_rows = _wants_rows(func)

    def score(prompts: list, answers: list[str], rows: Optional[list] = None) -> dict:
        try:
            out = func(prompts, answers, rows) if with_rows else func(prompts, answers)
        except ScorerError:
            raise
        except Exception as e:
            raise ScorerError(f"behaviour scorer '{label}' failed: {type(e).__name__}: {e}") from None
        if not isinstance(out, dict) or not out:
            raise ScorerError(f"behaviour scorer '{label}' must return a non-empty dict of name -> number, "
                              f"got {type(out).__name__}")
        result = {}
        for key, value in out.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScorerError(f"behaviour scorer '{label}' returned {key}={value!r}; every value must be "
                                  "a finite number")
            result[str(key)] = float(value)
        result.setdefault("mean_answer_words", length_scores(prompts, answers)["mean_answer_words"])
        result["n"] = float(len(answers))
        return result

    return score


def behaviour_scores(name: Optional[str], prompts: list, answers: list[str], rows: Optional[list] = None,
                     regex: Optional[str] = None) -> dict:
    """Score `answers` (one per entry of `prompts`, and of `rows` when given) with scorer `name`."""
    if len(prompts) != len(answers):
        raise ScorerError(f"behaviour scorer '{name or 'length'}': {len(prompts)} prompts but {len(answers)} answers")
    return resolve_scorer(name, regex)(prompts, answers, rows)
