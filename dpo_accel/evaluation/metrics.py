"""Per-example preference metrics, kept on the device and gathered across processes once per report.

Metrics are kept per example ([B] tensors) over every micro-batch of a logging step or an eval pass,
so a mean is over all examples of all processes, not over rank 0's last micro-batch. The gather happens
once, when the step is logged (litgpt's ``sync_on_compute``), not per micro-batch; the result is what
``gather_for_metrics`` per micro-batch gave, element for element and in the same order: the duplicated
tail of an uneven last batch is dropped, using the remainder recorded when that batch was added.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def example_metrics(out, policy: dict) -> dict[str, torch.Tensor]:
    """[B] tensors for one micro-batch from a LossOutput and the policy's log-probs.

    With a rejected side: loss, rewards (chosen, rejected, margins, accuracies), summed log-probs and the
    objective's extras (e.g. "nll" when an NLL term is in the loss). Without one (sft-format data, or sft
    training that skipped the rejected forward) rewards compare nothing, so they are left out and "nll",
    the per-token NLL of the chosen answer, is reported instead. A mixture-of-experts model's auxiliary
    loss (a scalar per micro-batch) is reported as "aux_loss", the same value for each of its examples.
    """
    m = {"loss": out.losses.detach().float(), "logps/chosen": policy["chosen_logps"].detach().float()}
    if "desirable" in policy:  # KTO rows: one completion each (its rejected side only estimates the KL)
        d, reward = policy["desirable"].bool(), out.chosen_rewards.detach().float()
        nan = torch.full_like(reward, float("nan"))  # averaged over the rows of that label only (PARTIAL_KEYS)
        m.update({"rewards/desirable": torch.where(d, reward, nan), "rewards/undesirable": torch.where(d, nan, reward)})
    elif "rejected_logps" in policy:
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
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        m["aux_loss"] = aux.detach().float().reshape(()).expand_as(m["loss"])
    return m


@dataclass
class Report:
    """One logging step's (or eval pass's) metrics over all processes."""

    means: dict[str, float]
    tokens: float  # real tokens of the pairs (non-padding, chosen and rejected rows)
    processed_tokens: float  # tokens the decoder ran on (padding included, a shared prefix once)
    pairs: int


# Per-example metrics that apply to some rows only (NaN elsewhere), averaged over the rows they apply to and
# left out of a report that has none.
PARTIAL_KEYS = ("rewards/desirable", "rewards/undesirable")
COUNT_KEYS = ("chosen_input_ids", "rejected_input_ids", "chosen_attention_mask", "rejected_attention_mask")


class MetricAccumulator:
    """Holds each micro-batch's [B] metrics on its device; `collect()` gathers them once and resets.

    Every process must call `collect()` at the same step (it is a collective).
    """

    def __init__(self, accelerator, layout="concat"):
        self.accelerator = accelerator
        # How the decoder sees a batch, which sets the processed tokens: a layout name, or a function of the
        # batch (PreferenceLogpsModel.layout_of, where the layout is chosen per batch)
        self.layout = layout
        self.pending: list[tuple[dict[str, torch.Tensor], Optional[int]]] = []
        self.batches: list[dict] = []

    def add(self, metrics: dict[str, torch.Tensor], batch: dict) -> None:
        state = self.accelerator.gradient_state
        keep = state.remainder if state.end_of_dataloader and state.remainder > 0 else None
        self.pending.append(({k: v.detach() for k, v in metrics.items()}, keep))
        self.batches.append({k: batch[k] for k in COUNT_KEYS if k in batch})  # counted at collect(): no sync now

    def collect(self) -> Report:
        """Means over every example added since the last call, on every process; two collectives in all."""
        pending, batches = self.pending, self.batches
        self.pending, self.batches = [], []
        if not pending:
            return Report({}, 0.0, 0.0, 0)
        keys = list(pending[0][0])
        sizes = [m[keys[0]].shape[0] for m, _ in pending]
        local = torch.stack([torch.cat([m[k].float() for m, _ in pending]) for k in keys], dim=1)  # [N, K]
        processes = self.accelerator.num_processes
        gathered = self.accelerator.gather(local).reshape(processes, sum(sizes), len(keys)).cpu()
        pieces, offset = [], 0
        for size, (_, keep) in zip(sizes, pending):
            piece = gathered[:, offset:offset + size].reshape(processes * size, len(keys))  # rank-major, as gathered
            pieces.append(piece[:keep] if keep is not None else piece)
            offset += size
        means = {}
        for i, k in enumerate(keys):
            values = torch.cat([p[:, i].contiguous() for p in pieces])
            if k in PARTIAL_KEYS:
                values = values[~values.isnan()]
                if values.numel() == 0:  # no row of that kind since the last report: nothing to average
                    continue
            means[k] = float(values.mean())
        real = processed = 0.0
        for batch in batches:
            r, p = token_counts(batch, self.layout(batch) if callable(self.layout) else self.layout)
            real, processed = real + r, processed + p
        counts = torch.tensor([real, processed], dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return Report(means, float(counts[0]), float(counts[1]), sum(p.shape[0] for p in pieces))


def batch_layout(model):
    """What a `MetricAccumulator` reads a batch's layout from: the log-prob module's per-batch choice
    (``layout_of``) where it has one, else its settled ``layout``."""
    return getattr(model, "layout_of", None) or model.layout


def token_counts(batch: dict, layout: str = "concat") -> tuple[float, float]:
    """(real tokens, processed tokens) of this process's batch: real counts every non-padding token of the
    chosen and rejected rows; processed what the decoder ran on under `layout` (logps.processed_tokens:
    padding included, a shared prefix once)."""
    from dpo_accel.model.logps import processed_tokens

    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    real = float(sum(m.sum() for m in masks))
    return real, float(processed_tokens(batch, layout))
