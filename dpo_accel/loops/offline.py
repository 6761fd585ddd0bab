"""Offline preference training on fixed rows: DPO and its family on pairs, KTO on labelled rows, SFT on the
chosen answers. The kind's forward is the original DPO trainer's ``concatenated_forward`` (chosen and rejected
in one pass) feeding the objective; the engine takes the steps.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_lora.yaml
"""
from __future__ import annotations

import torch

from dpo_accel.config.plan import Plan
from dpo_accel.data.unpaired import kto_inputs
from dpo_accel.evaluation.metrics import MetricAccumulator, batch_layout, example_metrics
from dpo_accel.loops.finish import held_out_metrics
from dpo_accel.loops.policy_run import PolicyRun, run_policy
from dpo_accel.objectives.registry import compute_objective

__all__ = ["OfflineKind", "progress_postfix", "run_offline"]


class OfflineKind:
    """Micro-batches of the training split in the sampler's order; forward, reference log-probs, objective."""

    def __init__(self, run: PolicyRun):
        self.run = run
        self.metrics = MetricAccumulator(run.accelerator, batch_layout(run.accelerator.unwrap_model(run.model)))

    def batches(self, engine):
        return engine.fixed_batches(self.run.train_loader, self.run.sampler)

    def forward(self, batch: dict) -> torch.Tensor:
        run = self.run
        if not run.plan.pairs:  # e.g. sft on preference data: train on prompt -> chosen, no rejected forward
            batch = {k: v for k, v in batch.items() if not k.startswith("rejected_")}
        policy, reference = run.model(**batch), run.reference.logps(batch, "train")
        if run.plan.objective.unpaired:  # KTO: labels and the reference point over all processes
            policy = kto_inputs(run.accelerator, batch, policy, reference)
        out = compute_objective(run.plan.objective, policy, reference)
        self.metrics.add(example_metrics(out, policy), batch)
        return out.loss

    def collect(self, seconds: float) -> dict:
        report = self.metrics.collect()
        return {**report.means, "tokens_per_second": report.tokens / seconds,
                "processed_tokens_per_second": report.processed_tokens / seconds,
                "pairs_per_second": report.pairs / seconds,
                "num_tokens": report.tokens, "num_pairs": report.pairs}  # since the last line

    def evaluate(self):
        return held_out_metrics(self.run)

    def progress(self, metrics: dict) -> dict:
        return progress_postfix(metrics)


def progress_postfix(metrics: dict) -> dict:
    """What the progress bar shows: the loss, and the reward accuracy where there is a rejected side
    (the NLL where there is not, e.g. sft on single-answer data)."""
    postfix = {"loss": f"{metrics['loss']:.4f}"} if "loss" in metrics else {}
    if "rewards/accuracies" in metrics:
        postfix["acc"] = f"{metrics['rewards/accuracies']:.2f}"
    elif "nll" in metrics:
        postfix["nll"] = f"{metrics['nll']:.3f}"
    return postfix


def run_offline(plan: Plan) -> dict:
    """Set up, train on the fixed rows, finish; returns the summary."""
    return run_policy(plan, OfflineKind)
