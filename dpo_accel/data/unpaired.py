"""KTO on unpaired feedback: labelled rows, their mismatched KL completions, the reference point over processes.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_kto.yaml

A KTO row is (prompt, completion, label). To reuse the pair forward unchanged (prefix sharing included),
each row becomes a "pair" whose chosen side is its completion and whose rejected side is a completion
of another row under this row's prompt: the mismatched pair from which KTO estimates its reference
point z_0 = KL(π(y'|x) ‖ π_ref(y'|x)) (objectives.registry). The mismatch is drawn once per split from a seeded
permutation (TRL shuffles completions within dataset batches), so each row's KL completion is fixed and
a resumed run sees the same ones. A preference set is split into one desirable (chosen) and one
undesirable (rejected) row per pair.

Truncation (data.tokenize.truncate_unpaired): a row is cut by its own prompt + completion alone, never by its
KL partner's length; its KL sequence keeps the row's (cut) prompt and its completion is cut to fit after it,
so the two sides still share the prompt (prefix sharing runs it once). Training batches of KTO rows are an
epoch-seeded shuffle whatever data.group_by_length says (loops.policy_run.build_loaders): grouped by length,
a batch's reference point z_0 would follow the lengths and a batch could hold one label only.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch

from dpo_accel.outputs.console import log
from dpo_accel.data.formats import DataError, MixtureDict
from dpo_accel.data.formats import content_hash
from dpo_accel.objectives.registry import LOSSES, kl_reference_point

__all__ = ["is_unpaired", "kto_inputs", "mismatched_sources", "unpaired_splits", "weight_hint"]


def is_unpaired(loss_cfg: Any) -> bool:
    """Whether the recipe's objective trains on labelled single completions (KTO)."""
    names = loss_cfg.loss_type if isinstance(loss_cfg.loss_type, list) else [loss_cfg.loss_type]
    return any(n in LOSSES and LOSSES[n].unpaired for n in names)


def _split_pairs(batch: dict) -> dict:
    """Each preference pair -> its chosen answer (desirable) and its rejected answer (undesirable)."""
    out = {"prompt": [], "chosen": [], "label": []}
    for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
        out["prompt"] += [prompt, prompt]
        out["chosen"] += [chosen, rejected]
        out["label"] += [True, False]
    return out


def mismatched_sources(prompts: list, completions: list, seed: int) -> np.ndarray:
    """For each row i a row j whose prompt and completion both differ from i's: j's completion is i's KL
    completion. A seeded cycle through a random permutation, moved further along where it would match."""
    n = len(prompts)
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    answers = [json.dumps(c, sort_keys=True) for c in completions]
    order = np.random.default_rng(seed).permutation(n)
    source = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order):
        for step in range(1, n):
            j = order[(k + step) % n]
            if keys[j] != keys[i] and answers[j] != answers[i]:
                source[i] = j
                break
        else:
            raise DataError("KTO needs rows with at least two different prompts and completions to estimate its "
                            "KL reference point; add rows")
    return source


def unpaired_splits(splits, loss_cfg: Any, seed: int):
    """Normalised splits -> KTO rows {prompt, chosen (the completion), rejected (its KL completion), label}.

    Unpaired rows (data.format: unpaired) are kept; preference pairs are split into two rows. Logs the
    desirable/undesirable counts of the training split and the paper's weighting hint when they are off."""
    import datasets

    if isinstance(splits, MixtureDict):
        raise DataError("loss_type kto does not take data.dataset_mixture yet; give one data.dataset_name")
    out = {}
    for key, ds in splits.items():
        if "label" not in ds.column_names:
            if "rejected" not in ds.column_names:
                raise DataError(f"loss_type kto needs labelled rows (prompt, completion, label) or preference pairs; "
                                f"split '{key}' has one answer per prompt (sft data)")
            ds = ds.map(_split_pairs, batched=True, remove_columns=ds.column_names,
                        new_fingerprint=content_hash("kto-split", ds._fingerprint), desc=f"split {key} pairs into KTO rows")
        source = mismatched_sources(ds["prompt"], ds["chosen"], seed)
        completions = ds["chosen"]
        ds = ds.add_column("rejected", [completions[j] for j in source],
                           new_fingerprint=content_hash("kto-kl", ds._fingerprint, seed))
        out[key] = ds
    labels = np.asarray(out["train"]["label"], dtype=bool)
    desirable, undesirable = int(labels.sum()), int((~labels).sum())
    log(f"KTO rows: {desirable} desirable, {undesirable} undesirable (train)")
    hint = weight_hint(desirable, undesirable, loss_cfg.desirable_weight, loss_cfg.undesirable_weight)
    if hint:
        log(hint)
    return datasets.DatasetDict(out)


def weight_hint(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> Optional[str]:
    """The KTO paper's advice for imbalanced data (Section 4.2, as TRL checks it): λ_D n_D / (λ_U n_U) should lie
    in [1, 4/3]. Returns a one-line hint with the ranges that satisfy it, or None when it holds."""
    if desirable == 0 or undesirable == 0:
        return (f"KTO: the training rows are all {'un' if desirable == 0 else ''}desirable; the loss then only "
                "moves one side (add rows with the other label)")
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    d_lo, d_hi = undesirable_weight * undesirable / desirable, undesirable_weight * undesirable * 4 / 3 / desirable
    u_lo, u_hi = desirable_weight * desirable * 3 / 4 / undesirable, desirable_weight * desirable / undesirable
    return (f"KTO: desirable_weight x {desirable} / (undesirable_weight x {undesirable}) = {ratio:.2f} is outside the "
            f"paper's [1, 4/3]; set loss.desirable_weight in [{d_lo:.2f}, {d_hi:.2f}] or loss.undesirable_weight in "
            f"[{u_lo:.2f}, {u_hi:.2f}] (one of them)")


def kto_inputs(accelerator, batch: dict, policy: dict, reference: Optional[dict]) -> dict:
    """The policy's log-probs plus what KTO reads beyond them: each row's label and the reference point z_0,
    this process's batch estimate averaged over all processes (equal batches: the estimate of the global batch)."""
    if "desirable" not in batch:
        raise DataError("loss_type kto got a batch without labels; the data were not made into KTO rows "
                        "(dpo_accel.data.unpaired.unpaired_splits)")
    ref_kl = reference["rejected_logps"] if reference is not None else torch.zeros_like(policy["rejected_logps"])
    z = (policy["rejected_logps"].float() - ref_kl.float()).mean().detach().reshape(1)
    if accelerator is not None and accelerator.num_processes > 1:
        z = accelerator.gather(z)  # clamped after the mean over processes, not per process (as TRL)
    return {**policy, "desirable": batch["desirable"], "kl": kl_reference_point(z, torch.zeros_like(z))}
