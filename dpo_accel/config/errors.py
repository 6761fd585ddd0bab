"""The recipe error and the project's one spelling helper: the bottom of the package (imports nothing of it)."""
from __future__ import annotations

import difflib

__all__ = ["RecipeError", "did_you_mean"]


class RecipeError(ValueError):
    """A recipe problem a person must fix; the message is one line saying what and how."""


def did_you_mean(word: str, choices, cutoff: float = 0.5, list_choices: bool = False) -> str:
    """"; did you mean 'x'?" naming the closest of `choices` (the project's one spelling helper). Dotted keys
    also match by their last part (``learning_rate`` -> ``train.learning_rate``). With no close match: ""
    or, with `list_choices`, "; choose one of: a, b"."""
    word, choices = str(word), [str(c) for c in choices]
    leaf = word.split(".")[-1]
    by_leaf = [c for c in choices if "." in c and c.split(".")[-1] == leaf]
    close = by_leaf or difflib.get_close_matches(word, choices, n=1, cutoff=cutoff) or difflib.get_close_matches(
        leaf, [c.split(".")[-1] for c in choices], n=1, cutoff=0.6)
    if not close:
        return "; choose one of: " + ", ".join(choices) if list_choices else ""
    hit = close[0] if close[0] in choices else next(c for c in choices if c.endswith("." + close[0]))
    return f"; did you mean '{hit}'?"
