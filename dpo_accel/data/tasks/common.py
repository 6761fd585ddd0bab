"""What the shipped tasks share: the seeded pick of an answer kind, and the behaviour rates each reports over a set
of generations from its own answer scorer."""
from __future__ import annotations

import random
from typing import Callable

__all__ = ["behaviour_rates", "pick_kind"]


def behaviour_rates(prompts: list[str], answers: list[str], score_answer: Callable[[str, str], dict]) -> dict:
    """format_rate, correct_rate (0..1), mean_answer_words and n, where `score_answer(prompt, answer)` says
    whether one answer has the task's format and is correct."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    n = len(prompts)
    if n == 0:
        return {"format_rate": 0.0, "correct_rate": 0.0, "mean_answer_words": 0.0, "n": 0}
    scores = [score_answer(p, a) for p, a in zip(prompts, answers)]
    return {
        "format_rate": sum(s["format"] for s in scores) / n,
        "correct_rate": sum(s["correct"] for s in scores) / n,
        "mean_answer_words": sum(len(a.split()) for a in answers) / n,
        "n": n,
    }


def pick_kind(rng: random.Random, kind_weights) -> str:
    """One kind of (kind, weight) pairs, drawn with one rng.random() call (the datasets' generators rely on it)."""
    u, acc = rng.random(), 0.0
    for kind, weight in kind_weights:
        acc += weight
        if u < acc:
            return kind
    return kind_weights[-1][0]
