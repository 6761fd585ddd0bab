"""Where the reference log-probs come from: nowhere, the LoRA base, a frozen copy, or a cache.

Every strategy answers ``logps(batch, split) -> dict | None`` with the same keys as the policy's
log-prob module (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens), computed without
gradients. `build_reference` is the one factory (devices, sharding, the precomputed pre-pass); the
training loop never asks which strategy it holds. A vision-language policy (`vision.VisionLogpsModel`) gets
the same strategies through its own log-prob module: a copy is loaded as a VLM and takes the policy's
settled layout, and every strategy receives the whole batch, image tensors included.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from dpo_accel.outputs.console import log
from dpo_accel.outputs.files import atomic_write
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe

REF_KEYS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


def resolve_mode(recipe: Recipe, needs_reference: bool) -> str:
    """The concrete reference mode for a recipe: 'none', 'adapter_off', 'copy' or 'precomputed'."""
    mode, lora = recipe.reference.mode, recipe.lora.use_peft
    if not needs_reference:
        if mode not in ("auto", "none"):
            raise RecipeError(
                f"reference.mode '{mode}' but loss.loss_type {recipe.loss.loss_type!r} uses no reference model; "
                "set reference.mode: auto")
        return "none"
    if mode == "none":
        raise RecipeError(
            f"loss.loss_type {recipe.loss.loss_type!r} needs a reference model but reference.mode is 'none'; "
            "set reference.mode: auto, or loss.reference_free: true")
    if mode == "auto":
        mode = "adapter_off" if lora and not recipe.reference.ref_model_name_or_path else "copy"
    if mode == "adapter_off" and recipe.reference.ref_model_name_or_path:
        raise RecipeError("reference.ref_model_name_or_path needs reference.mode 'copy' or 'precomputed', not 'adapter_off'")
    return mode


class NoReference:
    """Reference-free objectives: no model, no compute."""

    def logps(self, batch: dict, split: str = "train") -> None:
        return None


class AdapterOffReference:
    """The LoRA base model: the policy itself with its adapters switched off (no second copy)."""

    def __init__(self, logps_module: torch.nn.Module):
        self.module = logps_module  # the un-wrapped PreferenceLogpsModel around the peft model

    @torch.no_grad()
    def logps(self, batch: dict, split: str = "train") -> dict:
        with self.module.model.disable_adapter():
            out = self.module(**batch)
        return {k: v.detach().float() for k, v in out.items() if k in REF_KEYS}


class CopyReference:
    """A frozen copy of the starting weights on this process's device (never DDP-wrapped or saved)."""

    def __init__(self, logps_module: torch.nn.Module, autocast):
        self.module = logps_module
        self.autocast = autocast  # accelerator.autocast, so the copy runs in the run's precision

    @torch.no_grad()
    def logps(self, batch: dict, split: str = "train") -> dict:
        with self.autocast():
            out = self.module(**batch)
        return {k: v.detach().float() for k, v in out.items() if k in REF_KEYS}


class PrecomputedReference:
    """Reference log-probs computed once per split, looked up by the batch's row index `idx`."""

    def __init__(self, tables: dict[str, dict[str, torch.Tensor]]):
        self.tables = tables

    def logps(self, batch: dict, split: str = "train") -> dict:
        table = self.tables[split]
        idx = batch["idx"].cpu()
        device = batch["chosen_input_ids"].device
        return {k: v[idx].to(device) for k, v in table.items()}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, so a cache never serves another model's log-probs."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights_fp: str, dataset_fp: str, settings: dict) -> str:
    blob = json.dumps({"weights": weights_fp, "data": dataset_fp, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def precompute_logps(accelerator, reference, dataset, collator, batch_size: int, cache_file: str,
                     split: str) -> dict[str, torch.Tensor]:
    """One pass of `reference` over `dataset`, sharded across processes, cached in `cache_file`.

    Rows are placed by their `idx`, so the order in which processes return them does not matter.
    The main process writes the file atomically; every process then reads the same tensors.
    """
    if not os.path.isfile(cache_file):
        loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=collator))
        n = len(dataset)
        table = {k: torch.zeros(n, dtype=torch.float32) for k in REF_KEYS}
        for batch in loader:
            out = reference.logps(batch, split)
            gathered = accelerator.gather_for_metrics({"idx": batch["idx"], **{k: out[k] for k in REF_KEYS}})
            idx = gathered["idx"].cpu()
            for k in REF_KEYS:
                table[k][idx] = gathered[k].float().cpu()
        if accelerator.is_main_process:
            with atomic_write(cache_file, unique=True) as tmp:
                save_file(table, tmp, metadata={"split": split, "rows": str(n)})
        accelerator.wait_for_everyone()
    return load_file(cache_file)


def default_cache_dir(recipe: Recipe) -> str:
    if recipe.reference.cache_dir:
        return recipe.reference.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(recipe.train.output_dir)), ".ref_cache")


def build_precomputed(accelerator, recipe: Recipe, source, source_model: torch.nn.Module,
                      splits: dict, collator, settings: dict) -> PrecomputedReference:
    """Compute (or load from cache) reference log-probs for every split with `source`."""
    weights_fp = weights_fingerprint(source_model)
    tables = {}
    for split, dataset in splits.items():
        key = cache_key(weights_fp, dataset._fingerprint, {"split": split, **settings})
        path = os.path.join(default_cache_dir(recipe), f"ref-{split}-{key}.safetensors")
        hit = "cached" if os.path.isfile(path) else "computing"
        log(f"reference log-probs for {split} ({len(dataset)} pairs): {hit} {path}")
        tables[split] = precompute_logps(accelerator, source, dataset, collator,
                                         recipe.train.per_device_eval_batch_size, path, split)
    return PrecomputedReference(tables)


def reference_summary(mode: str, model: Optional[torch.nn.Module]) -> str:
    if mode == "copy" and model is not None:
        from dpo_accel.model.loading import count_parameters

        return f"frozen copy ({count_parameters(model)[1] / 1e6:.1f}M params)"
    return {"none": "none (reference-free objective)", "adapter_off": "LoRA base (adapters disabled)",
            "precomputed": "precomputed log-probs (no reference model in memory)"}.get(mode, mode)


def reference_copy(recipe: Recipe, policy_module: torch.nn.Module, path: str, device) -> tuple:
    """(the frozen copy's HF model, its log-prob module): the policy's kind of module, a causal LM's with the
    recipe's options, a VLM's with the policy's settled layout."""
    from dpo_accel.model.loading import load_frozen_copy, load_frozen_vision_copy
    from dpo_accel.model.logps import PreferenceLogpsModel
    from dpo_accel.model.vision import VisionLogpsModel

    r, t = recipe.reference, recipe.train
    if isinstance(policy_module, VisionLogpsModel):
        copy = load_frozen_vision_copy(path, recipe.model, r.dtype, device)
        return copy, VisionLogpsModel(copy, chunk_size=t.logps_chunk_size, chunk_mb=t.logps_chunk_mb,
                                      settled_layout=policy_module.vision_layout)
    init = None if r.ref_model_name_or_path else recipe.lora.init_adapter  # the reference = the policy's start
    copy = load_frozen_copy(path, recipe.model, r.dtype, device, init_adapter=init)
    decision = getattr(policy_module, "decision", None)  # the policy's fitted layout cost: the same pick per batch
    return copy, PreferenceLogpsModel(copy, chunk_size=t.logps_chunk_size, packing=t.padding_free,
                                      prefix_sharing=t.prefix_sharing, layout_cost=decision and decision.cost)


def build_reference(accelerator, recipe: Recipe, mode: str, prepared_model, model_path: str, tokenized,
                    collator) -> tuple[object, Optional[torch.nn.Module]]:
    """The reference strategy for `mode` (see `resolve_mode`) and, for a frozen copy, the copy's HF model
    (for the start-up line). A copy is placed as the policy's backend needs (`distributed.place_reference`);
    a precomputed reference runs its pre-pass here, before training, with the policy in eval mode."""
    from dpo_accel.model.distributed import place_reference, reference_load_device
    from dpo_accel.model.loading import resolve_model_path

    r = recipe.reference
    if mode == "none":
        return NoReference(), None
    if mode == "adapter_off" or (mode == "precomputed" and recipe.lora.use_peft and not r.ref_model_name_or_path):
        source = AdapterOffReference(accelerator.unwrap_model(prepared_model))
        source_model = source.module.model
    else:
        path = resolve_model_path(r.ref_model_name_or_path) if r.ref_model_name_or_path else model_path
        placed = mode == "copy"  # a precomputed pre-pass keeps a replica: its cache key hashes the full weights
        device = reference_load_device(accelerator) if placed else accelerator.device
        copy, module = reference_copy(recipe, accelerator.unwrap_model(prepared_model), path, device)
        source = CopyReference(place_reference(accelerator, module) if placed else module, accelerator.autocast)
        source_model = copy
    if mode != "precomputed":
        return source, (source_model if mode == "copy" else None)
    splits = {name: tokenized[name] for name in ("train", "eval") if name in tokenized}
    settings = {"mixed_precision": accelerator.mixed_precision, "dtype": r.dtype or recipe.model.dtype,
                "max_length": recipe.data.max_length, "max_prompt_length": recipe.data.max_prompt_length}
    was_training = prepared_model.training
    prepared_model.eval()
    precomputed = build_precomputed(accelerator, recipe, source, source_model, splits, collator, settings)
    prepared_model.train(was_training)
    return precomputed, None  # the copy, if one was loaded, is released here
