"""Flat recipes in the alignment-handbook's / TRL's style, loaded as they are.

A handbook DPO or ORPO recipe is one flat mapping of HfArgumentParser fields (``model_name_or_path``,
``torch_dtype``, ``dataset_mixture``, ``beta``, ``learning_rate``, ``bf16``, ``use_peft``, ...).
`from_flat` maps each key to our section key (`FLAT`), converts the few whose values differ (`bf16:
true` is ``train.mixed_precision: bf16``; ``torch_dtype`` is ``model.dtype``; an ORPO recipe's
``beta`` is ORPO's lambda), lists the keys that mean nothing in this loop (`IGNORED`, each with the
reason) and stops at any other key with a did-you-mean. `load_recipe` calls it for any YAML whose
top-level keys are not all our sections, and prints the mapping once (on the main process).

ORPO: TRL's ORPOTrainer has no ``loss_type`` key. An explicit ``loss_type`` always decides (``orpo``:
ORPO; anything else is never overridden). Without one, the path decides only when it names ORPO as a
whole word, the handbook's layout: the folder ``orpo`` (``recipes/<model>/orpo/config_*.yaml``) or an
``orpo`` word in the file name (``handbook_orpo.yaml``; not ``corporate_dpo.yaml``, not
``dpo_vs_orpo.yaml``), and the recipe carries no key only DPOConfig has (`DPO_ONLY`). ORPO trains
``loss.loss_type: orpo`` with ``loss.orpo_lambda`` = its ``beta``.

Defaults: a key the flat file leaves out takes TRL's default where it differs from ours (`TRL_DEFAULTS`),
as TRL would run the same file; the printed mapping lists those as "TRL default".
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

from dpo_accel.config.errors import RecipeError, did_you_mean
from dpo_accel.config.schema import all_keys

SECTIONS = ("model", "lora", "reference", "data", "loss", "train", "eval")

# Flat key -> our key, where the value carries over unchanged (types are checked by the schema).
FLAT = {
    "model_name_or_path": "model.model_name_or_path",
    "tokenizer_name_or_path": "model.tokenizer_name_or_path",
    "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "load_in_4bit": "model.load_in_4bit",
    "use_peft": "lora.use_peft",
    "lora_r": "lora.lora_r",
    "lora_alpha": "lora.lora_alpha",
    "lora_dropout": "lora.lora_dropout",
    "lora_target_modules": "lora.lora_target_modules",
    "lora_modules_to_save": "lora.lora_modules_to_save",
    "dataset_name": "data.dataset_name",
    "dataset_config": "data.dataset_config",
    "dataset_train_split": "data.train_split",
    "dataset_test_split": "data.eval_split",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "truncation_mode": "data.truncation_mode",
    "preprocessing_num_workers": "data.num_proc",
    "dataset_num_proc": "data.num_proc",
    "dataloader_num_workers": "data.dataloader_num_workers",
    "loss_type": "loss.loss_type",
    "loss_weights": "loss.loss_weights",
    "beta": "loss.beta",
    "label_smoothing": "loss.label_smoothing",
    "reference_free": "loss.reference_free",
    "rpo_alpha": "loss.rpo_alpha",
    "simpo_gamma": "loss.simpo_gamma",
    "f_divergence_type": "loss.f_divergence_type",
    "f_alpha_divergence_coef": "loss.f_alpha_divergence_coef",
    "use_weighting": "loss.use_weighting",
    "discopop_tau": "loss.discopop_tau",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "per_device_eval_batch_size": "train.per_device_eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "padding_free": "train.padding_free",
    "torch_compile": "train.torch_compile",
    "auto_find_batch_size": "train.auto_find_batch_size",
    "push_to_hub": "train.push_to_hub",
    "hub_model_id": "train.hub_model_id",
    "do_eval": "eval.do_eval",
}

# Flat keys whose value is converted: key -> (our key, what the conversion is, for the printed mapping).
CONVERTED = {
    "torch_dtype": ("model.dtype", "the same name (auto: bf16 frozen weights under LoRA where the device has bf16 units)"),
    "dtype": ("model.dtype", "the same name (auto: bf16 frozen weights under LoRA where the device has bf16 units)"),
    "use_flash_attention_2": ("model.attn_implementation", "true -> flash_attention_2"),
    "bf16": ("train.mixed_precision", "true -> bf16, false -> no"),
    "fp16": ("train.mixed_precision", "true -> fp16, false -> no"),
    "report_to": ("train.report_to", "a name -> [name], none -> []"),
    "optim": ("train.optimizer", "adamw_* (torch, fused, paged, 8-bit) -> adamw (torch AdamW), rmsprop"),
    "lr_scheduler_type": ("train.lr_scheduler_type", "constant_with_warmup -> constant; linear / cosine as named"),
    "dataset_mixture": ("data.dataset_mixture", "no seed: seed 0, the handbook's default"),
    "dataset_mixer": ("data.dataset_mixture", "older handbook {id: fraction} -> sources with that weight"),
    "dataset_splits": ("data.dataset_mixture", "train_* -> each source's split, test_* -> its eval_split"),
    "precompute_ref_log_probs": ("reference.mode", "true -> precomputed"),
    "save_strategy": ("train.save_steps", "'no' -> 0 (no checkpoints); otherwise save_steps decides"),
    # No completion limit of its own here: without max_length, data.max_length = max_prompt_length (the file's, else
    # TRL's 512) + max_completion_length; with max_length, answers get max_length minus the kept prompt.
    "max_completion_length": ("data.max_length", "max_prompt_length + max_completion_length when max_length is unset"),
}

# Keys that mean nothing in this loop: key -> why.
IGNORED = {
    "hub_strategy": "push_to_hub uploads once, after the export",
    "hub_private_repo": "the hub repository's visibility is set on the hub",
    "hub_model_revision": "push_to_hub uploads to the default branch",
    "hub_revision": "push_to_hub uploads to the default branch",
    "push_to_hub_revision": "push_to_hub uploads to the default branch",
    "log_level": "logging is the [dpo_accel] lines and metrics.jsonl",
    "log_level_replica": "only the main process prints",
    "logging_first_step": "step 1 is always logged (logging_steps counts from it)",
    "logging_strategy": "logging_steps decides",
    "evaluation_strategy": "eval_steps decides (0: held-out eval at the end only)",
    "eval_strategy": "eval_steps decides (0: held-out eval at the end only)",
    "overwrite_output_dir": "a folder holding a run is refused unless --resume",
    "remove_unused_columns": "rows are normalised to prompt/chosen/rejected",
    "run_name": "trackers are named dpo_accel, logs go to output_dir/logs",
    "model_revision": "the model is read from the path or hub id as given",
    "gradient_checkpointing_kwargs": "checkpointing is always non-reentrant here",
    "chat_template": "the tokenizer's own chat template is used",
    "auto_insert_empty_system_msg": "prompts are templated as given",
    "tf32": "a CUDA matmul precision setting of the Trainer",
    "bf16_full_eval": "eval runs under the same autocast as training",
    "generate_during_eval": "eval.generation_prompts generates before and after training",
    "dataloader_num_workers": "batches are collated in the main process",
    "ddp_timeout": "the accelerate launch config sets the process group",
    "deepspeed": "the accelerate launch config picks the backend",
    "fsdp": "the accelerate launch config picks the backend",
    "fsdp_config": "the accelerate launch config picks the backend",
    "use_liger_kernel": "the LM head is chunked here already (train.logps_chunk_size)",
    "use_liger": "the LM head is chunked here already (train.logps_chunk_size)",
    "bnb_4bit_quant_type": "QLoRA loads NF4",
    "bnb_4bit_compute_dtype": "QLoRA computes in model.dtype",
    "use_bnb_nested_quant": "QLoRA here always double-quantises (bnb_4bit_use_double_quant)",
    "lora_task_type": "the adapter is always for causal LM",
    "disable_tqdm": "the progress bar shows on the main process",
    "save_only_model": "checkpoints keep what an exact resume needs",
    "include_tokens_per_second": "tokens_per_second is always logged",
    "dataset_text_field": "an SFT Trainer key; rows are normalised here",
    "wandb_project": "set WANDB_PROJECT in the environment",
    "wandb_entity": "set WANDB_ENTITY in the environment",
}

# use_bnb_nested_quant: false (TRL's default) asks for what this loop cannot do: no recipe key turns it off.
NESTED_QUANT_OFF = "false cannot be honoured: QLoRA here always double-quantises (bnb_4bit_use_double_quant)"

ORPO_HINT = "orpo"
# DPOConfig keys TRL's ORPOConfig does not have: a recipe carrying one is a DPO recipe, whatever its path says.
DPO_ONLY = ("loss_type", "loss_weights", "label_smoothing", "reference_free", "rpo_alpha", "f_divergence_type",
            "f_alpha_divergence_coef", "use_weighting", "discopop_tau", "precompute_ref_log_probs")

# TRL's defaults where they differ from dpo_accel's, taken for a key the flat file leaves out: flat key -> value.
# Follows TRL 0.14-0.16 (DPOConfig, and ORPOConfig, which has the same values for these keys) on transformers'
# TrainingArguments. Left out on purpose, ours kept: logging_steps (500 from TrainingArguments up to TRL 0.16, TRL's
# own 10 later), bf16 (false, later true; here the launch config decides), do_eval (false, but TrainingArguments
# turns it on with any eval_strategy), save_total_limit (None: keep all, which train.save_total_limit cannot say),
# lora_target_modules (None: peft's per-architecture choice), report_to (all installed trackers).
TRL_DEFAULTS = {
    "num_train_epochs": 3.0,  # TrainingArguments
    "per_device_train_batch_size": 8,  # TrainingArguments
    "save_steps": 500,  # TrainingArguments (with its save_strategy "steps")
    "learning_rate": 1e-6,  # DPOConfig / ORPOConfig
    "max_length": 1024,  # DPOConfig / ORPOConfig
    "max_prompt_length": 512,  # DPOConfig / ORPOConfig
}
TRL_DEFAULT = "TRL default"  # the note of a row whose value is TRL's default (the file does not set the key)


def is_flat(raw: Any) -> bool:
    """A handbook/TRL-style recipe: a mapping with a top-level key of the handbook's (a mistyped section
    name alone is not one: it keeps the sectioned recipe's did-you-mean)."""
    return isinstance(raw, dict) and any(key in FLAT or key in CONVERTED or key in IGNORED for key in raw)


def sectioned(raw: Any, path: Optional[str] = None) -> Any:
    """`raw` as our sections: a flat recipe is mapped (`from_flat`) and its mapping printed on the
    main process; anything else is returned unchanged."""
    if not is_flat(raw):
        return raw
    out, rows = from_flat(raw, path)
    if is_main_process():
        print(format_mapping(rows, path), flush=True)
    return out


def orpo_source(raw: dict, path: Optional[str]) -> Optional[str]:
    """What makes the recipe ORPO ("loss_type", "(folder)" or "(file name)"), or None: an explicit loss_type
    always decides; the path only names ORPO as a whole word, and only for a recipe with no DPO-only key."""
    if "loss_type" in raw:
        return "loss_type" if raw["loss_type"] == ORPO_HINT else None
    if path is None or any(key in raw for key in DPO_ONLY):
        return None
    if os.path.basename(os.path.dirname(os.path.abspath(path))).lower() == ORPO_HINT:
        return "(folder)"
    words = set(re.split(r"[^a-z0-9]+", os.path.splitext(os.path.basename(path))[0].lower()))
    return "(file name)" if ORPO_HINT in words and "dpo" not in words else None


def _optimizer(value):
    if isinstance(value, str) and (value.startswith("adamw") or value.startswith("paged_adamw")):
        return "adamw"
    return value  # rmsprop passes; anything else fails validation naming the choices


def _report_to(value):
    if value in (None, "none"):
        return []
    return [value] if isinstance(value, str) else value


def _mixer(raw: dict) -> dict:
    """The older handbook's ``dataset_mixer: {id: fraction}`` + ``dataset_splits`` as a dataset_mixture."""
    splits = raw.get("dataset_splits") or ["train", "test"]
    train = [s for s in splits if "train" in s]
    test = [s for s in splits if "test" in s]
    if len(train) != 1 or len(test) > 1:
        raise RecipeError(f"dataset_splits {splits} must name one train_* split and at most one test_* split")
    mixer = raw.get("dataset_mixer")
    if not isinstance(mixer, dict) or not mixer:
        raise RecipeError("dataset_mixer must map dataset ids to the fraction of rows kept, e.g. {org/name: 1.0}")
    sources = []
    for name, frac in mixer.items():
        src = {"id": name, "split": train[0]}
        if frac != 1:
            src["weight"] = frac
        if test:
            src["eval_split"] = test[0]
        sources.append(src)
    # the older mixer shuffled with seed 42 and kept each source's first int(fraction * n) rows
    return {"datasets": sources, "seed": 42, "form": "dataset_mixer"}


def from_flat(raw: dict, path: Optional[str] = None) -> tuple[dict, list]:
    """(sectioned raw recipe, mapping rows) of a flat recipe.

    Mapping rows are (flat key, our key or None, note): note is the conversion, or for an ignored
    key (our key None) why it means nothing here, or for a key the file leaves out "TRL default: ..."
    (`TRL_DEFAULTS`). Section mappings given beside flat keys are kept; a key set both ways is an error.
    """
    out: dict = {section: dict(raw[section]) for section in SECTIONS if isinstance(raw.get(section), dict)}
    rows: list = []
    orpo = orpo_source(raw, path)

    def put(key: str, target: str, value: Any, note: str = "") -> None:
        section, leaf = target.split(".", 1)
        if leaf in out.get(section, {}):
            raise RecipeError(f"recipe key '{key}' sets '{target}', which the recipe also sets; keep one")
        out.setdefault(section, {})[leaf] = value
        rows.append((key, target, note))

    for key, value in raw.items():
        if key not in SECTIONS:
            _map_key(key, value, raw, orpo is not None, out, put, rows)
    _completion_length(raw, out, put, rows)
    if orpo:
        out.setdefault("loss", {})["loss_type"] = "orpo"
        rows.append((orpo, "loss.loss_type", "orpo: an ORPO recipe"))
    _trl_defaults(out, put)
    return out, rows


def _map_key(key: str, value: Any, raw: dict, orpo: bool, out: dict, put, rows: list) -> None:
    """Map one flat key: `put` it under our key (with the conversion as its note), or add a row saying why
    it means nothing here; an unknown key stops with a did-you-mean."""
    precision = "bf16" if raw.get("bf16") else "fp16" if raw.get("fp16") else "no"
    if key == "use_bnb_nested_quant" and not value:
        rows.append((key, None, NESTED_QUANT_OFF))
    elif key in IGNORED:
        rows.append((key, None, IGNORED[key]))
    elif key == "beta" and orpo:
        put(key, "loss.orpo_lambda", value, "ORPO's beta is its lambda (TRL ORPOConfig)")
    elif key == "loss_type" and orpo:
        return  # set by from_flat
    elif key in FLAT:
        put(key, FLAT[key], value)
    elif key in ("torch_dtype", "dtype"):
        put(key, "model.dtype", value, CONVERTED[key][1] if value == "auto" else "")
    elif key == "use_flash_attention_2":
        if value:
            put(key, "model.attn_implementation", "flash_attention_2", CONVERTED[key][1])
        else:
            rows.append((key, None, "false: model.attn_implementation decides"))
    elif key in ("bf16", "fp16"):
        if "mixed_precision" not in out.get("train", {}):  # the first of the two flags sets both
            put(key, "train.mixed_precision", precision, CONVERTED[key][1])
        else:
            rows.append((key, "train.mixed_precision", f"read with the other flag: {precision}"))
    elif key == "report_to":
        put(key, "train.report_to", _report_to(value), "" if isinstance(value, list) else CONVERTED[key][1])
    elif key == "optim":
        put(key, "train.optimizer", _optimizer(value), f"{value} -> {_optimizer(value)}")
    elif key == "lr_scheduler_type":
        mapped = {"constant_with_warmup": "constant"}.get(value, value)
        put(key, "train.lr_scheduler_type", mapped, f"{value} -> {mapped}" if mapped != value else "")
    elif key == "dataset_mixture":
        mixture = dict(value) if isinstance(value, dict) else value
        seeded = isinstance(mixture, dict) and "seed" not in mixture
        if seeded:
            mixture["seed"] = 0
        put(key, "data.dataset_mixture", mixture, CONVERTED[key][1] if seeded else "")
    elif key == "dataset_mixer":
        put(key, "data.dataset_mixture", _mixer(raw), CONVERTED[key][1])
    elif key == "dataset_splits":
        if "dataset_mixer" not in raw:
            raise RecipeError("dataset_splits needs dataset_mixer beside it (or use dataset_mixture)")
        rows.append((key, "data.dataset_mixture", CONVERTED[key][1]))
    elif key == "precompute_ref_log_probs":
        if value:
            put(key, "reference.mode", "precomputed", CONVERTED[key][1])
        else:
            rows.append((key, None, "false: reference.mode auto decides"))
    elif key == "save_strategy":
        if value == "no":
            put(key, "train.save_steps", 0, CONVERTED[key][1])
        else:
            rows.append((key, None, "save_steps decides"))
    elif key != "max_completion_length":  # mapped by _completion_length, once max_length is known
        known = sorted(set(FLAT) | set(CONVERTED) | set(IGNORED) | set(SECTIONS))
        hint = did_you_mean(key, known) or did_you_mean(key, all_keys())
        raise RecipeError(f"unknown recipe key '{key}' (a flat handbook/TRL key){hint}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _completion_length(raw: dict, out: dict, put, rows: list) -> None:
    """TRL's max_completion_length, which has no key here: without max_length it sets data.max_length to
    max_prompt_length (the file's, else TRL's) + max_completion_length; with max_length, answers already get
    max_length minus the kept prompt, so it changes nothing."""
    key = "max_completion_length"
    if key not in raw:
        return
    value = raw[key]
    if value is not None and (not _is_count(value) or value < 1):
        raise RecipeError(f"{key} must be a positive number of tokens (or null), got {value!r}")
    data = out.get("data", {})
    if value is None or "max_length" in data:
        rows.append((key, None, "answers get max_length minus the kept prompt"))
        return
    prompt = data.get("max_prompt_length", TRL_DEFAULTS["max_prompt_length"])
    if _is_count(prompt):  # otherwise the schema names the bad max_prompt_length
        put(key, "data.max_length", prompt + value, f"max_prompt_length + {key}: {prompt} + {value}")


def _trl_defaults(out: dict, put) -> None:
    """TRL's default for each key of `TRL_DEFAULTS` the recipe leaves unset, so a flat file trains as TRL
    would run it; TRL's max_prompt_length only where it is below max_length (which TRL allows, our schema not)."""
    for key, value in TRL_DEFAULTS.items():
        section, leaf = FLAT[key].split(".", 1)
        if leaf in out.get(section, {}):
            continue
        limit = out.get("data", {}).get("max_length")
        if key == "max_prompt_length" and _is_count(limit) and value >= limit:
            continue  # dpo_accel's default kept (the schema checks it against max_length)
        put(key, FLAT[key], value, f"{TRL_DEFAULT}: {value}, not in the file")


def format_mapping(rows: list, path: Optional[str] = None) -> str:
    """The printed mapping: the file's mapped keys first, then TRL's defaults taken for the keys it leaves
    out, then the ignored keys with their reason."""
    defaults = [r for r in rows if r[1] is not None and r[2].startswith(TRL_DEFAULT)]
    mapped = [r for r in rows if r[1] is not None and r not in defaults]
    ignored = [r for r in rows if r[1] is None]
    width = max((len(r[0]) for r in rows), default=10)
    counts = f"{len(mapped)} keys mapped, " + (f"{len(defaults)} TRL defaults, " if defaults else "")
    lines = [f"[dpo_accel] handbook/TRL recipe{f' {path}' if path else ''}: {counts}{len(ignored)} ignored"]
    lines += [f"  {k:<{width}} -> {t}{f'  ({n})' if n else ''}" for k, t, n in mapped + defaults]
    lines += [f"  {k:<{width}}    ignored: {n}" for k, _, n in ignored]
    return "\n".join(lines)


def is_main_process() -> bool:
    """Rank 0 (or a single process): where the mapping is printed, once per launch."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
