"""Held-out evaluation: preference metrics (accuracy, margins) and sampled generations.

Launch: evaluation runs inside ``dpo_accel/train.py`` every ``train.eval_steps`` and at the end.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from dpo_accel.losses import compute_objective
from dpo_accel.metrics import MetricAccumulator, example_metrics


@torch.no_grad()
def evaluate_preferences(accelerator, model, reference, loader, loss_cfg) -> dict[str, float]:
    """Mean per-example metrics over the whole held-out split (all processes), keys prefixed 'eval/'."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(accelerator, accelerator.unwrap_model(model).layout)
    for batch in loader:
        policy = model(**batch)
        ref = reference.logps(batch, "eval")
        out = compute_objective(loss_cfg, policy, ref)
        acc.add(example_metrics(out, policy), batch)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in acc.means().items()}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16,
                     autocast=None) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) for `prompts`, tokenised exactly as in
    training (`data.prompt_input_ids`) and left-padded in batches."""
    from dpo_accel.data import prompt_input_ids

    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    device = next(model.parameters()).device
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [prompt_input_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return [a.strip() for a in answers]


def behaviour_scores(name: Optional[str], prompts: list, answers: list[str], rows: Optional[list] = None,
                     regex: Optional[str] = None) -> dict[str, float]:
    """Measures of generated answers by the scorer `eval.behaviour` names (dpo_accel.scorers)."""
    from dpo_accel.scorers import behaviour_scores as score

    return score(name, prompts, answers, rows, regex)


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A markdown table of held-out measures, policy before vs after training."""
    keys = [k for k in after if k in before and k != "n"]
    rows = ["| held-out measure | before | after |", "| --- | ---: | ---: |"]
    if "n" in after:
        rows[0] = f"| held-out measure ({int(after['n'])} generations) | before | after |"
    rows += [f"| {k} | {before[k]:.3f} | {after[k]:.3f} |" for k in keys]
    return "\n".join(rows)
