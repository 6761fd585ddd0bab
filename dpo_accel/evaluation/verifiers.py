"""Verifiers: the scores of sampled answers that online and iterative DPO turn into pairs (best vs worst).

``train.online_verifier`` names a built-in (``arith``) or ``module:function`` (a module or a .py path)
returning one number per answer; ``train.online_reward_model`` scores with a one-label sequence classifier
instead, as ``eval.reward_model`` does.
"""
from __future__ import annotations

from typing import Callable

from dpo_accel.config.errors import RecipeError

__all__ = ["VERIFIERS", "answer_scorer", "arith_verifier", "resolve_verifier"]


def arith_verifier(prompts: list, answers: list[str]) -> list[float]:
    """The shipped addition task: 1 for the right sum plus 1 for the exact "a + b = c." form."""
    from dpo_accel.data.tasks.arith import score_answer

    out = []
    for p, a in zip(prompts, answers):
        s = score_answer(p if isinstance(p, str) else p[-1]["content"], a)
        out.append(float(s["correct"]) + float(s["format"]))
    return out


VERIFIERS = {"arith": arith_verifier}


def resolve_verifier(spec: str) -> Callable[[list, list], list]:
    """A built-in verifier name or ``module:function`` (a module or a .py path) -> func(prompts, answers)."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise RecipeError(f"train.online_verifier '{spec}' is neither a built-in ({', '.join(VERIFIERS)}) nor "
                          "module:function")
    from dpo_accel.evaluation.scorers import import_callable

    return import_callable(spec)


def answer_scorer(train, device) -> Callable[[list, list], list]:
    """func(prompts, answers) -> one score per answer: the recipe's reward model, else its verifier."""
    if train.online_reward_model:
        from dpo_accel.evaluation.judge import load_reward_model, reward_scores

        model, tokenizer = load_reward_model(train.online_reward_model, device)
        return lambda prompts, answers: reward_scores(model, tokenizer, prompts, answers)
    return resolve_verifier(train.online_verifier)
