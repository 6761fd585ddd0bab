"""The final export that `from_pretrained` loads: ``model/`` (merged with LoRA) and ``adapter/``, each with its
tokenizer, the resolved recipe and a model card, each appearing atomically; a sharded policy is gathered first.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from dpo_accel.config.schema import Recipe, dump_recipe
from dpo_accel.outputs.checkpoints import SaveError, check_finite, space_message
from dpo_accel.outputs.console import log
from dpo_accel.outputs.files import atomic_write


def export_model(accelerator, model, tokenizer, recipe: Recipe, output_dir: str, merge: bool,
                 card: Optional[dict] = None) -> dict[str, str]:
    """Write the final model in HF safetensors format; returns {kind: directory}. With `card` (the run's
    summary so far), each folder gets a README.md model card (dpo_accel.outputs.model_card).

    With LoRA: ``<output_dir>/adapter`` (peft adapter) and, when `merge`, ``<output_dir>/model``
    (adapter merged into the base). Without LoRA: ``<output_dir>/model``. Each directory also holds
    the tokenizer and the resolved recipe, and appears atomically.
    """
    from dpo_accel.model.distributed import export_from_copy, gathered_copy

    check_finite(accelerator, model, "the export")
    wrapper = accelerator.unwrap_model(model)  # the PreferenceLogpsModel given to prepare()
    unwrapped = wrapper.model
    # Gathers sharded (FSDP / ZeRO-3) weights onto the main process (ZeRO-3 returns None elsewhere);
    # keys lose the wrapper's prefix.
    state_dict = {k[len("model."):]: v for k, v in (accelerator.get_state_dict(model) or {}).items()
                  if k.startswith("model.")}
    written: dict[str, str] = {}
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return written
    if export_from_copy(accelerator, unwrapped):  # FSDP2 / DeepSpeed: save a plain CPU copy of the gathered weights
        unwrapped, state_dict = gathered_copy(unwrapped, state_dict), None
    targets = []
    if hasattr(unwrapped, "peft_config"):
        start = adapter_start_model(recipe)
        if start is None:
            log("adapter/ not written: the adapter applies to the base with lora.init_adapter merged "
                "in, which no folder holds (no model/ next to the init adapter); model/ is the result")
        else:
            targets.append(("adapter", lambda d: _save_adapter(unwrapped, state_dict, d, start)))
        if merge:
            targets.append(("model", lambda d: _save_merged(unwrapped, d)))
    else:
        targets.append(("model", lambda d: unwrapped.save_pretrained(d, state_dict=state_dict)))
    for kind, save in targets:
        final = os.path.join(output_dir, kind)
        try:
            with atomic_write(final) as tmp:
                save(tmp)
                tokenizer.save_pretrained(tmp)
                dump_recipe(recipe, os.path.join(tmp, "recipe.yaml"))
                if card is not None:
                    from dpo_accel.outputs.model_card import write_model_card

                    write_model_card(tmp, kind, recipe, card, final)
        except OSError as e:  # a full disk: the folder from before (if any) is untouched
            size = sum(p.numel() * p.element_size() for p in unwrapped.parameters())
            raise SaveError(space_message(f"{kind}/", output_dir, e, output_dir, 0, size).replace(
                "the previous checkpoint is kept", "the checkpoints are kept")) from None
        written[kind] = final
    accelerator.wait_for_everyone()
    return written


def adapter_start_model(recipe: Recipe) -> Optional[str]:
    """The model the exported adapter applies to: "" for the recipe's own base (peft records it), the
    merged folder of the init adapter's run (``<run>/model`` next to ``<run>/adapter``) when
    ``lora.init_adapter`` was merged in first, None when no folder holds that starting point."""
    init = recipe.lora.init_adapter
    if not init:
        return ""
    merged = os.path.join(os.path.dirname(os.path.abspath(init).rstrip(os.sep)), "model")
    return merged if os.path.isfile(os.path.join(merged, "config.json")) else None


def _save_adapter(peft_model, state_dict, directory: str, start: str) -> None:
    """peft's adapter folder; with an init adapter, its config names the merged start model it applies to."""
    peft_model.save_pretrained(directory, state_dict=state_dict)
    if start:
        path = os.path.join(directory, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = start
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


def _save_merged(peft_model, directory: str) -> None:
    """Merge a copy of the adapter into the base weights (the training model is left untouched)."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(directory)
