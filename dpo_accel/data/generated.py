"""Preference pairs from generated answers (online and iterative DPO): a seeded endless order over the
training prompts, and each prompt's best- vs worst-scored answer as its pair."""
from __future__ import annotations

import numpy as np

__all__ = ["build_pairs", "prompt_order"]


def build_pairs(prompts: list, answers: list[list[str]], scores: list[list[float]]) -> tuple[list[dict], int]:
    """(pairs, skipped): per prompt its best-scored answer as chosen and its worst as rejected (the first of
    equals); a prompt whose answers all score the same, or whose best and worst read the same, is skipped."""
    pairs, skipped = [], 0
    for prompt, group, score in zip(prompts, answers, scores):
        best, worst = int(np.argmax(score)), int(np.argmin(score))
        if score[best] == score[worst] or group[best].strip() == group[worst].strip():
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                      "score_chosen": float(score[best]), "score_rejected": float(score[worst])})
    return pairs, skipped


def prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start..start+count of an endless seeded order over n prompts (a new shuffle each epoch)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng(seed + epoch).permutation(n)[i]))
    return out
