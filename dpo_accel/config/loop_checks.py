"""The rules of each way of training that no single key shows: what online and iterative DPO need, the
keys or combinations a loop kind cannot honour, and what a vision-language model's run cannot (yet) do. Each returns one line saying what to change (None: nothing);
`validate` in dpo_accel/config/schema.py raises it before any compute."""
from __future__ import annotations

from typing import Optional

from dpo_accel.config.errors import RecipeError

__all__ = ["check_iterative", "check_loop_kind", "check_online", "check_vision"]

SCORER_KEYS = "train.online_verifier or train.online_reward_model"


def loss_types(recipe) -> list:
    return [recipe.loss.loss_type] if isinstance(recipe.loss.loss_type, str) else list(recipe.loss.loss_type)


def check_online(recipe) -> Optional[str]:
    """What stops an online run before any compute (None: nothing)."""
    t = recipe.train
    if t.online_generations == 0:
        return None
    if t.online_generations < 2:
        return f"train.online_generations is {t.online_generations}; use 0 (offline) or 2 or more answers per prompt"
    if (t.online_verifier is None) == (t.online_reward_model is None):
        return "train.online_generations needs exactly one of train.online_verifier and train.online_reward_model"
    if t.online_temperature <= 0:
        return "train.online_temperature must be > 0 (greedy answers to one prompt would all be the same)"
    if t.online_missing_eos_penalty is not None and t.online_missing_eos_penalty < 0:
        return (f"train.online_missing_eos_penalty must be >= 0 (taken off a cut answer's score) or null "
                f"(cut answers left out), got {t.online_missing_eos_penalty}")
    if t.online_verifier is not None:
        from dpo_accel.evaluation.verifiers import resolve_verifier

        try:
            resolve_verifier(t.online_verifier)
        except RecipeError as e:  # scorers.ScorerError included: a module or function that is not there
            return str(e)
    if recipe.reference.mode == "precomputed":
        return "reference.mode precomputed cannot score generated pairs; use adapter_off, copy or auto"
    types = loss_types(recipe)
    if "bradley_terry" in types:
        return ("train.online_generations trains a policy on generated pairs; loss_type bradley_terry trains a reward "
                "model on fixed pairs (set train.online_generations: 0, or a policy objective such as sigmoid)")
    if "kto" in types:
        return ("train.online_generations makes pairs (best vs worst answer); loss_type kto trains on unpaired rows "
                "(use a paired objective such as sigmoid, or train.online_generations: 0)")
    return None


def check_iterative(recipe) -> Optional[str]:
    """What stops an iterative run before any compute (None: nothing); one line each."""
    from dpo_accel.evaluation.verifiers import resolve_verifier

    t = recipe.train
    if t.iterative_rounds < 0:
        return f"train.iterative_rounds must be >= 0 (0: off), got {t.iterative_rounds}"
    if t.iterative_rounds == 0:
        return None
    if t.online_generations < 2:
        return (f"train.iterative_rounds needs train.online_generations >= 2 (answers sampled per prompt; the best and "
                f"worst make a pair), got {t.online_generations}")
    if (t.online_verifier is None) == (t.online_reward_model is None):
        return f"train.iterative_rounds needs exactly one of {SCORER_KEYS} to score the answers"
    if t.online_temperature <= 0:
        return "train.online_temperature must be > 0 (greedy answers to one prompt would all be the same)"
    if t.online_missing_eos_penalty is not None and t.online_missing_eos_penalty < 0:
        return (f"train.online_missing_eos_penalty must be >= 0 (taken off a cut answer's score) or null "
                f"(cut answers left out), got {t.online_missing_eos_penalty}")
    if t.iterative_prompts < 0:
        return f"train.iterative_prompts must be >= 0 (0: every training prompt each round), got {t.iterative_prompts}"
    if t.online_verifier is not None:
        try:
            resolve_verifier(t.online_verifier)
        except RecipeError as e:  # scorers.ScorerError included: a module or function that is not there
            return str(e)
    if "bradley_terry" in loss_types(recipe):
        return "train.iterative_rounds trains a policy; loss_type bradley_terry trains a reward model (set one or the other)"
    if recipe.data.format in ("sft", "unpaired"):
        return (f"train.iterative_rounds writes preference pairs and evaluates on held-out pairs; data.format "
                f"'{recipe.data.format}' has none (use a preference dataset for the prompts)")
    if recipe.lora.use_peft and not t.export_merged:
        return "train.iterative_rounds with LoRA needs train.export_merged: true (the merged model/ is the next round's policy)"
    if recipe.reference.ref_model_name_or_path:
        return ("reference.ref_model_name_or_path: an iterative run sets each round's reference itself; choose it with "
                "train.iterative_reference (previous or initial)")
    if t.iterative_reference == "initial" and recipe.lora.init_adapter:
        return ("train.iterative_reference initial with lora.init_adapter: no folder holds base + adapter for the "
                "reference copy; point model.model_name_or_path at the adapter run's merged model/ instead")
    return None


# Keys of a policy's forward that a reward model (a sequence classifier scoring whole rows) cannot honour: each
# (key, the value that asks for it, what to set instead).
REWARD_MODEL_REFUSES = (
    ("train.padding_free", True, "false"), ("train.prefix_sharing", True, "null"), ("train.pack_pairs", True, "null"),
    ("train.logps_path", "lean", "auto"), ("train.torch_compile", True, "false"),
    ("train.auto_find_batch_size", True, "false"), ("train.push_to_hub", True, "false (upload model/ yourself)"),
    ("lora.init_adapter", "set", "null"), ("eval.reward_model", "set", "null"),
)


def first_refused(recipe, refuses) -> Optional[tuple]:
    """(key, its value, what to set instead) for the first of `refuses` ((key, the value that asks for it, or
    "set" for any value but null, what to set instead)) that the recipe asks for; None when it asks for none."""
    for key, asks, instead in refuses:
        section, leaf = key.split(".")
        value = getattr(getattr(recipe, section), leaf)
        if (value is not None) if asks == "set" else value == asks:
            return key, value, instead
    return None


def check_loop_kind(recipe) -> Optional[str]:
    """A key that the recipe's loop kind would silently ignore (None: nothing)."""
    if "bradley_terry" not in loss_types(recipe):
        return None
    hit = first_refused(recipe, REWARD_MODEL_REFUSES)
    if hit:
        key, value, instead = hit
        return f"{key} is {value!r}, which a reward model (loss_type bradley_terry) cannot use; set {key}: {instead}"
    if recipe.eval.generation_prompts:
        return ("eval.generation_prompts: a reward model (loss_type bradley_terry) does not generate; set "
                "eval.generation_prompts: 0")
    if recipe.data.format in ("sft", "unpaired"):
        return (f"data.format '{recipe.data.format}' has no rejected answers; a reward model (loss_type bradley_terry) "
                "trains on pairs")
    return None


# Keys a vision-language model's run cannot honour (its log-probs come from model.vision, not logps' text
# paths): each (key, the value that asks for it, what to set instead).
VISION_REFUSES = (
    ("train.padding_free", True, "false"), ("train.pack_pairs", True, "null"), ("train.logps_path", "full", "auto"),
    ("train.torch_compile", True, "false"), ("train.auto_find_batch_size", True, "false"),
    ("model.load_in_4bit", True, "false"), ("lora.init_adapter", "set", "null"), ("eval.reward_model", "set", "null"),
)


def check_vision(recipe, family: str) -> Optional[str]:
    """What a run of the vision-language model of type `family` cannot do (None: nothing); the policy run asks
    once it has read the model's config, before any weight loads."""
    t = recipe.train
    if t.online_generations or t.iterative_rounds:
        return (f"online and iterative DPO generate from text prompts; model type '{family}' is a vision-language "
                f"model, which trains offline on fixed pairs for now (set train.online_generations: 0 and "
                f"train.iterative_rounds: 0)")
    types = loss_types(recipe)
    if "bradley_terry" in types or "kto" in types or recipe.data.format in ("sft", "unpaired"):
        return (f"a vision-language model (model type '{family}') trains on preference pairs; loss_type "
                f"{recipe.loss.loss_type!r} / data.format '{recipe.data.format}' is not supported with images yet")
    hit = first_refused(recipe, VISION_REFUSES)
    if hit:
        key, value, instead = hit
        return (f"{key} is {value!r}, which the vision-language model's log-prob path (model type '{family}') "
                f"does not support; set {key}: {instead}")
    return None
