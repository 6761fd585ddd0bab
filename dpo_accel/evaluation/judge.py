"""Reward-model judging of held-out answers (``eval.reward_model``): mean rewards and win rates.

The DPO paper judged its policies by comparing generated answers, not by the preference data's
implicit rewards. Here a sequence-classification reward model (the format reward models on the hub
use: ``AutoModelForSequenceClassification`` with one label) scores, on the same held-out prompts,
the policy's answers after training, the starting policy's answers and the dataset's chosen answers.
Reported: the mean reward of each, and win rates after-vs-before and after-vs-chosen (a tie counts
half), each with a percentile-bootstrap 95% interval over the prompts: with ``eval.num_return_sequences``
k > 1 a prompt's k answers are not independent, so a resample draws prompts, each with all its answers
(resampling answers would narrow the interval by about sqrt(k)).

Batched on the main process's device under the run's autocast; the chat template is applied when the
reward model's tokenizer has one (the prompt as a user turn, the answer as the assistant's), else the
text is prompt and answer joined by a blank line.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Callable, Optional, Sequence

import torch

from dpo_accel.config.errors import RecipeError


def load_reward_model(path: str, device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local folder or hub id; one line saying what to fix when it is not a
    one-label sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        where = "folder" if os.path.isdir(path) else "hub id (no such local folder)"
        raise RecipeError(f"eval.reward_model '{path}' ({where}) does not load as "
                          f"AutoModelForSequenceClassification: {str(e).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise RecipeError(f"eval.reward_model '{path}' has {model.config.num_labels} labels; a reward model "
                          "has one (num_labels=1)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # batched scoring finds each row's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer


def _message_text(value) -> str:
    return str(value[-1]["content"]) if isinstance(value, list) else str(value)


def render(tokenizer, prompt, answer: str) -> str:
    """The text the reward model reads for one (prompt, answer)."""
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    return f"{_message_text(prompt)}\n\n{answer}"


def render_prompt(tokenizer, prompt) -> str:
    """The start of `render`'s text that is the prompt: what comes before the answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{_message_text(prompt)}\n\n"


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: Sequence, answers: Sequence[str], batch_size: int = 16,
                  max_length: int = 1024, autocast: Optional[Callable] = None) -> list[float]:
    """One scalar reward per (prompt, answer), in batches of right-padded rows."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    texts = [render(tokenizer, p, a) for p, a in zip(prompts, answers)]
    special = not getattr(tokenizer, "chat_template", None)  # a rendered template already holds its BOS
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    scores: list[float] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=special, return_tensors="pt").to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            scores += logits[:, 0].float().cpu().tolist()
    finally:
        tokenizer.padding_side = side
    return scores


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of rows where a beats b; a tie counts half."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win rate needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def bootstrap_interval(a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95, groups: Optional[Sequence] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `win_rate(a, b)`, resampling clusters of rows (pairs kept together).

    `groups`: one key per row (the prompt); rows with equal keys form one cluster, drawn whole, and a
    resample's win rate is its rows' share of wins. Without `groups` every row is its own cluster."""
    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    keys = range(len(outcomes)) if groups is None else [json.dumps(g, sort_keys=True, default=str) for g in groups]
    if len(keys) != len(outcomes):
        raise ValueError(f"{len(keys)} group keys for {len(outcomes)} rows")
    sums: dict = {}
    sizes: dict = {}
    for key, outcome in zip(keys, outcomes):
        sums[key] = sums.get(key, 0.0) + outcome
        sizes[key] = sizes.get(key, 0) + 1
    cluster_sums, cluster_sizes = list(sums.values()), list(sizes.values())
    rng = random.Random(seed)
    n = len(cluster_sums)
    stats = []
    for _ in range(n_resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(cluster_sums[i] for i in picks) / sum(cluster_sizes[i] for i in picks))
    stats.sort()
    low = stats[int((1 - level) / 2 * n_resamples)]
    high = stats[min(int((1 + level) / 2 * n_resamples), n_resamples - 1)]
    return low, high


def compare(after: Sequence[float], before: Sequence[float], chosen: Sequence[float], n_resamples: int = 1000,
            seed: int = 0, prompts: Optional[Sequence] = None) -> dict:
    """Mean rewards and win rates (with 95% intervals) from three aligned lists of rewards; `prompts` (aligned
    too) makes the intervals resample prompts, each with all its answers (see `bootstrap_interval`)."""
    out = {"reward_after": sum(after) / len(after), "reward_before": sum(before) / len(before),
           "reward_chosen": sum(chosen) / len(chosen)}
    for name, other in (("before", before), ("chosen", chosen)):
        low, high = bootstrap_interval(after, other, n_resamples, seed, groups=prompts)
        out[f"win_rate_vs_{name}"] = win_rate(after, other)
        out[f"win_rate_vs_{name}_low"], out[f"win_rate_vs_{name}_high"] = low, high
    return out


def judge_answers(path: str, prompts: Sequence, before: Sequence[str], after: Sequence[str],
                  chosen: Sequence, device, dtype: torch.dtype = torch.float32, batch_size: int = 16,
                  autocast: Optional[Callable] = None, seed: int = 0) -> dict:
    """Load the reward model at `path`, score the three answer sets, compare them.

    Returns {"scores": compare(...), "rewards": {"before": [...], "after": [...], "chosen": [...]}};
    `chosen` may hold conversations (the last message is the answer). Rows with the same prompt (its
    num_return_sequences answers) are one cluster of the intervals' bootstrap. The model is released after."""
    if not (len(prompts) == len(before) == len(after) == len(chosen)):
        raise ValueError(f"judging needs aligned lists: {len(prompts)} prompts, {len(before)} before, "
                         f"{len(after)} after, {len(chosen)} chosen answers")
    model, tokenizer = load_reward_model(path, device, dtype)
    rewards = {name: reward_scores(model, tokenizer, prompts, answers, batch_size, autocast=autocast)
               for name, answers in (("before", list(before)), ("after", list(after)),
                                     ("chosen", [_message_text(c) for c in chosen]))}
    del model
    scores = compare(rewards["after"], rewards["before"], rewards["chosen"], seed=seed, prompts=list(prompts))
    return {"scores": scores, "rewards": rewards}


def judge_table(scores: dict) -> str:
    """A markdown table of the reward model's verdict."""
    rows = ["| reward model | value | 95% interval |", "| --- | ---: | --- |"]
    for key in ("reward_before", "reward_after", "reward_chosen"):
        rows.append(f"| mean {key.replace('_', ' ')} | {scores[key]:.3f} | |")
    for name in ("before", "chosen"):
        key = f"win_rate_vs_{name}"
        rows.append(f"| win rate after vs {name} | {scores[key]:.3f} | "
                    f"{scores[key + '_low']:.3f} to {scores[key + '_high']:.3f} |")
    return "\n".join(rows)


def judge_reports(path: str, before: dict, after: dict, device, batch_size: int = 16,
                  autocast: Optional[Callable] = None, seed: int = 0) -> dict:
    """`judge_answers` on the loop's two generation reports (samples of prompt, answer and chosen, aligned)."""
    b, a = before["samples"], after["samples"]
    if [x["prompt"] for x in b] != [x["prompt"] for x in a] or any("chosen" not in x for x in a):
        raise ValueError("the before and after generations must answer the same prompts and carry the chosen answers")
    return judge_answers(path, [x["prompt"] for x in a], [x["answer"] for x in b], [x["answer"] for x in a],
                         [x["chosen"] for x in a], device, batch_size=batch_size, autocast=autocast, seed=seed)
