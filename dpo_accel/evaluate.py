"""Held-out evaluation: preference metrics (accuracy, margins) and sampled generations.

Launch: evaluation runs inside ``dpo_accel/train.py`` every ``train.eval_steps`` and at the end.
"""
from __future__ import annotations

from typing import Optional

import torch

from dpo_accel.losses import compute_objective
from dpo_accel.metrics import MetricAccumulator, example_metrics


@torch.no_grad()
def evaluate_preferences(accelerator, model, reference, loader, loss_cfg) -> dict[str, float]:
    """Mean per-example metrics over the whole held-out split (all processes), keys prefixed 'eval/'."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(accelerator)
    for batch in loader:
        policy = model(**batch)
        ref = reference.logps(batch, "eval")
        out = compute_objective(loss_cfg, policy, ref)
        acc.add(example_metrics(out, policy), batch)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in acc.means().items()}


def format_prompt(tokenizer, prompt) -> str:
    """The prompt as the model sees it in training: a user turn in the chat template when there is one."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16,
                     autocast=None) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) for `prompts`, left-padded in batches."""
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.config.use_cache = use_cache
        model.train(was_training)
    return [a.strip() for a in answers]


def behaviour_scores(name: Optional[str], prompts: list, answers: list[str]) -> dict[str, float]:
    """Task-specific measures of generated answers (e.g. 'arith': format and correctness rates)."""
    if not name:
        return {"mean_answer_words": sum(len(a.split()) for a in answers) / max(len(answers), 1)}
    if name == "arith":
        from dpo_accel.arith_task import behaviour_summary

        return behaviour_summary(prompts, answers)
    raise ValueError(f"unknown eval.behaviour '{name}'; available: arith")


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A markdown table of held-out measures, policy before vs after training."""
    keys = [k for k in after if k in before]
    rows = ["| held-out measure | before | after |", "| --- | ---: | ---: |"]
    rows += [f"| {k} | {before[k]:.3f} | {after[k]:.3f} |" for k in keys]
    return "\n".join(rows)
