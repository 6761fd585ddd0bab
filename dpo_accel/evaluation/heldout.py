"""Held-out evaluation: preference metrics (accuracy, margins), and the before/after table.

Evaluation runs every ``train.eval_steps`` and at the end; every process calls it (the metrics are gathered).
"""
from __future__ import annotations

import torch

from dpo_accel.data.unpaired import kto_inputs
from dpo_accel.objectives.registry import compute_objective
from dpo_accel.evaluation.metrics import MetricAccumulator, batch_layout, example_metrics


@torch.no_grad()
def evaluate_preferences(accelerator, model, reference, loader, loss_cfg) -> dict[str, float]:
    """Mean per-example metrics over the whole held-out split (all processes), keys prefixed 'eval/'.
    ``loss_cfg``: the run's ``objectives.registry.LossPlan`` (or a LossConfig)."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(accelerator, batch_layout(accelerator.unwrap_model(model)))
    for batch in loader:
        policy = model(**batch)
        ref = reference.logps(batch, "eval")
        if getattr(loss_cfg, "unpaired", False):  # KTO: labels and the reference point over all processes
            policy = kto_inputs(accelerator, batch, policy, ref)
        out = compute_objective(loss_cfg, policy, ref)
        acc.add(example_metrics(out, policy), batch)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in acc.collect().means.items()}


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A markdown table of held-out measures, policy before vs after training."""
    keys = [k for k in after if k in before and k != "n"]
    rows = ["| held-out measure | before | after |", "| --- | ---: | ---: |"]
    if "n" in after:
        rows[0] = f"| held-out measure ({int(after['n'])} generations) | before | after |"
    rows += [f"| {k} | {before[k]:.3f} | {after[k]:.3f} |" for k in keys]
    return "\n".join(rows)
