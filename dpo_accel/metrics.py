"""Per-example preference metrics, gathered across processes and averaged over every micro-batch.

Metrics are kept per example ([B] tensors) until the end of an optimizer step or an eval pass, so a
mean is over all examples of all processes (`gather_for_metrics` drops the duplicated tail of an
uneven last batch), not over rank 0's last micro-batch.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def example_metrics(out, policy: dict) -> dict[str, torch.Tensor]:
    """[B] tensors for one micro-batch from a LossOutput and the policy's log-probs.

    With a rejected side: loss, rewards (chosen, rejected, margins, accuracies), summed log-probs and the
    objective's extras (e.g. "nll" when an NLL term is in the loss). Without one (sft-format data, or sft
    training that skipped the rejected forward) rewards compare nothing, so they are left out and "nll",
    the per-token NLL of the chosen answer, is reported instead.
    """
    m = {"loss": out.losses.detach().float(), "logps/chosen": policy["chosen_logps"].detach().float()}
    if "rejected_logps" in policy:
        m.update({
            "rewards/chosen": out.chosen_rewards.detach().float(),
            "rewards/rejected": out.rejected_rewards.detach().float(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).detach().float(),
            "logps/rejected": policy["rejected_logps"].detach().float(),
        })
    else:
        m["nll"] = -(policy["chosen_logps"] / policy["chosen_tokens"].clamp(min=1)).detach().float()
    for key, value in out.metrics.items():
        m[key] = value.detach().float()
    return m


class MetricAccumulator:
    """Collects gathered per-example metrics and token counts; `means()` reports and resets."""

    def __init__(self, accelerator, layout: str = "concat"):
        self.accelerator = accelerator
        self.layout = layout  # how the decoder sees a batch (PreferenceLogpsModel.layout): sets the processed tokens
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tokens = 0.0
        self.processed_tokens = 0.0
        self.pairs = 0

    def add(self, metrics: dict[str, torch.Tensor], batch: dict) -> None:
        gathered = self.accelerator.gather_for_metrics(metrics)
        for key, value in gathered.items():
            self.values[key].append(value.float().cpu())
        real, processed = token_counts(batch, self.layout)
        counts = torch.tensor([real, processed], dtype=torch.float64, device=batch["chosen_input_ids"].device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        self.tokens += float(counts[0])
        self.processed_tokens += float(counts[1])
        self.pairs += int(gathered["loss"].numel())

    def means(self) -> dict[str, float]:
        result = {k: float(torch.cat(v).mean()) for k, v in self.values.items() if v}
        self.values.clear()
        return result

    def reset_counts(self) -> tuple[float, float, int]:
        counts = (self.tokens, self.processed_tokens, self.pairs)
        self.tokens, self.processed_tokens, self.pairs = 0.0, 0.0, 0
        return counts


def token_counts(batch: dict, layout: str = "concat") -> tuple[float, float]:
    """(real tokens, processed tokens) of this process's batch: real counts every non-padding token of the
    chosen and rejected rows; processed what the decoder ran on under `layout` (logps.processed_tokens:
    padding included, a shared prefix once)."""
    from dpo_accel.logps import processed_tokens

    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    real = float(sum(m.sum() for m in masks))
    return real, float(processed_tokens(batch, layout))
