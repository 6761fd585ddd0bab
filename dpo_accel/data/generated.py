"""Preference pairs from generated answers (online and iterative DPO): a seeded endless order over the
training prompts, each prompt's best- vs worst-scored answer as its pair, and the pair's training row built
from the token ids the policy sampled.

An answer that did not end (``train.online_max_new_tokens`` cut it before a stop token) is, by
``train.online_missing_eos_penalty``: null, left out of its prompt's pick (it can be neither chosen nor
rejected: a cut answer as chosen would teach the policy to stop mid-answer, and one as rejected compares an
unfinished answer with a finished one); a number, kept with that number taken off its score, as TRL's
online DPO does (a finished answer then wins over a cut one of the same score).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dpo_accel.data.tokenize import truncate
from dpo_accel.model.logps import IGNORE_INDEX

__all__ = ["best_and_worst", "build_pairs", "missing_eos_scores", "prompt_order", "sampled_pair_row"]


def missing_eos_scores(scores: Sequence[float], ended: Sequence[bool], penalty: Optional[float]) -> list:
    """Scores for the pick: an answer that did not end gets None (left out) or its score minus `penalty`."""
    if penalty is None:
        return [s if e else None for s, e in zip(scores, ended)]
    return [s if e else s - penalty for s, e in zip(scores, ended)]


def best_and_worst(texts: Sequence[str], scores: Sequence[Optional[float]]) -> Optional[tuple[int, int]]:
    """(best, worst) indices of one prompt's answers (the first of equals; None scores left out), or None when
    fewer than two answers are left, all score the same, or the best and worst read the same."""
    kept = [i for i, s in enumerate(scores) if s is not None]
    if len(kept) < 2:
        return None
    best = max(kept, key=lambda i: (scores[i], -i))
    worst = min(kept, key=lambda i: (scores[i], i))
    if scores[best] == scores[worst] or texts[best].strip() == texts[worst].strip():
        return None
    return best, worst


def build_pairs(prompts: list, answers: list[list[str]], scores: list[list],
                tokens: Optional[list[list]] = None) -> tuple[list[dict], int]:
    """(pairs, skipped): per prompt its best-scored answer as chosen and its worst as rejected (`best_and_worst`);
    a prompt without such a pair is skipped and counted. With `tokens` (per prompt, its answers' `Sampled`:
    prompt_ids and answer_ids), each pair also holds the ids the policy sampled (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``), which training then uses instead of re-tokenising the text."""
    pairs, skipped = [], 0
    for n, (prompt, group, score) in enumerate(zip(prompts, answers, scores)):
        pick = best_and_worst(group, score)
        if pick is None:
            skipped += 1
            continue
        best, worst = pick
        pair = {"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                "score_chosen": float(score[best]), "score_rejected": float(score[worst])}
        if tokens is not None:
            sampled = tokens[n]
            pair.update(prompt_ids=list(sampled[best].prompt_ids), chosen_ids=list(sampled[best].answer_ids),
                        rejected_ids=list(sampled[worst].answer_ids))
        pairs.append(pair)
    return pairs, skipped


def sampled_pair_row(prompt_ids: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], d,
                     keep_any: bool = False) -> Optional[dict]:
    """The training row of a pair of sampled answers: the prompt's ids as generation saw them and each answer's
    sampled ids (no EOS added), cut by the data's truncation rule (`data.tokenize.truncate`); None when the cut
    leaves an answer empty or both the same (unless `keep_any`: a stand-in row that carries no weight)."""
    prompt, (c, r), _ = truncate(list(prompt_ids), [list(chosen), list(rejected)], d.max_length,
                                 d.max_prompt_length, d.truncation_mode)
    if not keep_any and (not c or not r or c == r):
        return None
    row = {"prompt_length": len(prompt), "source_idx": 0}
    for side, ids in (("chosen", c), ("rejected", r)):
        row[f"{side}_input_ids"] = prompt + ids
        row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + ids
        row[f"{side}_length"] = len(prompt) + len(ids)
    return row


def prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start..start+count of an endless seeded order over n prompts (a new shuffle each epoch)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng(seed + epoch).permutation(n)[i]))
    return out
