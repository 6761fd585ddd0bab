"""Model cards for the exported ``model/`` and ``adapter/`` folders, and the optional hub upload.

A hub user opening the folder expects a README.md that says what the weights are and how to load
them: base model, objective and hyperparameters, data and row counts, LoRA settings, steps and tokens
seen, the held-out before/after table, framework versions. `write_model_card` writes it from the
resolved recipe and the run's summary, so every number on the card is the run's own.

``train.push_to_hub: true`` with ``train.hub_model_id`` uploads the merged model (else the adapter)
through ``huggingface_hub`` after the local export is complete; where there is no network (or no
token) the run ends with a one-line error and the local folders intact.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

from dpo_accel.objectives.registry import LOSSES
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe

# The offline alias names a hub model: the card's `base_model` says which.
HUB_BASE = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PACKAGES = ("dpo_accel", "torch", "transformers", "accelerate", "peft", "datasets")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hub_base_model(name: str) -> Optional[str]:
    """The hub id of the base model, or None when it is a local folder or file."""
    if name in HUB_BASE:
        return HUB_BASE[name]
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _objective(recipe: Recipe) -> list[str]:
    loss = recipe.loss
    types = loss.loss_type if isinstance(loss.loss_type, list) else [loss.loss_type]
    weights = loss.loss_weights or [1.0] * len(types)
    keys = [k for t in types if t in LOSSES for k in LOSSES[t].hyperparameters]  # the registry's own list
    text = " + ".join(f"{w:g} x `{t}`" if len(types) > 1 else f"`{t}`" for t, w in zip(types, weights))
    lines = [f"- Objective: {text} (dpo_accel.objectives.registry registry)"]
    lines += [f"- `{k}`: {getattr(loss, k)}" for k in dict.fromkeys(keys)]
    if loss.rpo_alpha:
        lines.append(f"- `rpo_alpha`: {loss.rpo_alpha} (an NLL term on the chosen answers, RPO)")
    if loss.reference_free:
        lines.append("- reference-free (uniform reference)")
    return lines


def _data(recipe: Recipe, stats: dict) -> list[str]:
    d = recipe.data
    mixture = getattr(d, "dataset_mixture", None)
    if mixture:
        sources = ", ".join(f"`{m.get('id', m)}`" if isinstance(m, dict) else f"`{m}`" for m in mixture.get("datasets", []))
        lines = [f"- Sources (a mixture): {sources}"]
    else:
        lines = [f"- Source: `{d.dataset_name}`" + (f" (config `{d.dataset_config}`)" if d.dataset_config else "")]
    for split, s in stats.items():
        lines.append(f"- `{split}`: {s['pairs']} rows read, {s['kept']} kept ({s['truncated']} truncated, "
                     f"{s['dropped']} dropped) at `max_length` {d.max_length}, `max_prompt_length` {d.max_prompt_length}")
    return lines


def _training(recipe: Recipe, summary: dict) -> list[str]:
    t = recipe.train
    lines = [f"- Optimizer steps: {summary.get('global_step', 0)}"]
    if summary.get("pairs_seen") is not None:
        lines.append(f"- Pairs seen: {summary['pairs_seen']}")
    if summary.get("tokens_seen") is not None:
        lines.append(f"- Tokens seen: {int(summary['tokens_seen'])} (chosen and rejected rows, padding excluded)")
    lines += [f"- `{k}`: {getattr(t, k)}" for k in (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "optimizer", "weight_decay", "max_grad_norm", "mixed_precision", "seed")]
    lines.append(f"- Reference: `{summary.get('reference_mode') or recipe.reference.mode}`"
                 + (f" (`{recipe.reference.ref_model_name_or_path}`)" if recipe.reference.ref_model_name_or_path else ""))
    return lines


def _lora(recipe: Recipe) -> list[str]:
    lo = recipe.lora
    if not lo.use_peft:
        return ["- Full fine-tuning (no LoRA)"]
    lines = [f"- `lora_r`: {lo.lora_r}, `lora_alpha`: {lo.lora_alpha}, `lora_dropout`: {lo.lora_dropout}",
             f"- `lora_target_modules`: {lo.lora_target_modules}"]
    if lo.lora_modules_to_save:
        lines.append(f"- `lora_modules_to_save`: {lo.lora_modules_to_save}")
    if lo.init_adapter:
        lines.append(f"- started from base + `{lo.init_adapter}` merged in")
    return lines


def _how_to_load(kind: str, where: str, base: str) -> list[str]:
    if kind == "adapter":
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "", f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]


def model_card(kind: str, recipe: Recipe, summary: dict, where: str) -> str:
    """The README.md text for an exported folder; `kind` is "model" or "adapter", `where` the path or
    hub id the load snippet uses. `summary` holds what the run measured: global_step, data (row
    statistics), and where known pairs_seen, tokens_seen, table (before/after markdown), judge_table."""
    name = recipe.model.model_name_or_path
    hub = hub_base_model(name)
    base = hub or name
    front = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags:", "- dpo_accel", "- dpo"] + (["- lora"] if recipe.lora.use_peft else []) + ["---", ""]
    what = "LoRA adapter" if kind == "adapter" else ("merged model (LoRA adapter folded into the base)"
                                                     if recipe.lora.use_peft else "model")
    body = [f"# {os.path.basename(os.path.abspath(recipe.train.output_dir))}", "",
            f"A {what} trained from `{name}`" + (f" ({hub})" if hub and hub != name else "")
            + " with a DPO-family objective by dpo_accel (a plain Accelerate loop).", ""]
    if name in HUB_BASE:
        body += [f"The base weights were the `{name}` GGUF (Q4_1) de-quantised to float, which differ slightly from "
                 f"{hub}'s own; the merged `model/` holds exactly the weights that were trained.", ""]
    body += [
            "## Objective", *_objective(recipe), "", "## Data", *_data(recipe, summary.get("data", {})), "",
            "## Training", *_training(recipe, summary), "", "## LoRA", *_lora(recipe), ""]
    if summary.get("table"):
        body += ["## Held-out results (before and after training)", "", summary["table"], ""]
    if summary.get("judge_table"):
        body += ["## Reward-model judgement", "", f"Reward model: `{recipe.eval.reward_model}`", "",
                 summary["judge_table"], ""]
    body += ["## How to load", *_how_to_load(kind, where, base), "",
             "The resolved recipe that produced these weights is `recipe.yaml` in this folder.", "",
             "## Framework versions", *[f"- {p} {_version(p)}" for p in PACKAGES], ""]
    return "\n".join(front + body)


def write_model_card(directory: str, kind: str, recipe: Recipe, summary: dict, final: Optional[str] = None) -> str:
    """Write `<directory>/README.md`; the load snippet names the hub id when the run pushes there, else
    `final` (where the folder ends up; default `directory`)."""
    t = recipe.train
    where = t.hub_model_id if t.push_to_hub and t.hub_model_id else (final or directory)
    path = os.path.join(directory, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(kind, recipe, summary, where))
    return path


class PushError(RecipeError):
    """The hub upload failed; the local export is complete."""


def push_to_hub(exported: dict, repo_id: str) -> str:
    """Upload the merged model (else the adapter) to `repo_id`; returns the folder uploaded."""
    directory = exported.get("model") or exported.get("adapter")
    if not directory:
        raise PushError("train.push_to_hub: nothing was exported to upload")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=directory, repo_id=repo_id, commit_message="Upload from dpo_accel")
    except Exception as e:  # no network, no token, no permission: all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PushError(f"train.push_to_hub: uploading '{directory}' to '{repo_id}' failed ({type(e).__name__}: "
                        f"{first}); the local export is complete") from None
    return directory
