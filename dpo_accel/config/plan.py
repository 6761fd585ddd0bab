"""Preflight: a recipe resolved into a plan before anything heavy, so the run reads facts, never re-derives them.

    plan = preflight(recipe, resume)   # the start-up checks that need no weights: a one-line RecipeError / ValueError

It runs the recipe's cross-field rules (``config.schema.validate``, with each loop kind's rules from
``config.loop_checks``), the objective's (``objectives.registry.plan_loss``), the speed options this machine can
run (``model.speed.check_speed_options``), the weights' dtype (``model.dtype: auto``, settled for the device) and what this machine lacks (``check_machine``: flash-attn, a GPU for fp16),
the reference mode, the output folder (it can be made and written; a new run never lands in an old one's folder;
``--resume`` needs a complete checkpoint) and, on ``--resume``, that the checkpoint was written at
the same data position. Checks that need more come later, each as soon as what it needs exists: the launch
(``model.distributed.check_launch``, once the Accelerator exists) and the data (``check_resume_data``, once the
training split is tokenised).

Two facts need the built model and are settled once in ``loops.policy_run.setup`` (``Plan.settled``): the layout
of the forward (prefix sharing depends on the model's attention and type) and the micro-batch that
``train.auto_find_batch_size`` finds. ``recipe.yaml`` is written after both, so the run folder's recipe
and its checkpoints' recipes agree.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from dpo_accel.outputs.checkpoints import STATE_FILE, check_complete, latest_checkpoint
from dpo_accel.outputs.console import log
from dpo_accel.objectives.registry import LossPlan, plan_loss
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe, recipe_to_dict, validate

# Keys that decide which pairs form which optimizer step: a resumed run must keep them, or it continues at
# another position in the data. data.num_proc (tokenisation workers) and data.max_eval_samples do not.
POSITION_KEYS = ("train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.seed")
NOT_POSITION = ("data.num_proc", "data.dataloader_num_workers", "data.max_eval_samples")
# Keys whose values the restored optimizer and scheduler state carry (a new value would be silently ignored:
# the scheduler's base learning rates come back from the checkpoint), or that shape the saved weights.
STATE_KEYS = ("train.learning_rate", "train.optimizer", "train.weight_decay", "train.lr_scheduler_type",
              "train.warmup_steps", "train.warmup_ratio", "model.model_name_or_path", "model.gguf_file")


@dataclass(frozen=True)
class Geometry:
    """The batch: pairs per process per micro-batch, micro-batches per optimizer step, processes."""

    per_device: int
    accumulation: int
    processes: int

    @property
    def global_batch(self) -> int:
        """Pairs per optimizer step, over all processes."""
        return self.per_device * self.accumulation * self.processes


@dataclass(frozen=True)
class Plan:
    """What a run does, resolved from its recipe; read by every loop."""

    recipe: Recipe
    objective: LossPlan  # the loss's terms and what they read (reference, rejected answers, WPO terms)
    reference_mode: str  # none | adapter_off | copy | precomputed
    geometry: Geometry
    resume_from: Optional[str]  # the checkpoint folder a --resume continues; None for a new run
    search_micro_batch: bool  # train.auto_find_batch_size, on a new run (a resume keeps the checkpoint's)
    layout: Optional[str] = None  # "shared" | "concat" | "packed"; settled once the model exists

    @property
    def pairs(self) -> bool:
        """False when only the chosen answers are trained (sft): the rejected half is never run."""
        return self.objective.needs_rejected

    def settled(self, layout: str, micro_batch: Optional[int] = None) -> "Plan":
        """The plan once the model exists: its layout, and the micro-batch the search found (accumulation
        keeps their product); the recipe's batch keys follow, so the saved recipe says what ran."""
        geometry, recipe = self.geometry, self.recipe
        if micro_batch is not None:
            total = geometry.per_device * geometry.accumulation
            geometry = dataclasses.replace(geometry, per_device=micro_batch, accumulation=total // micro_batch)
            recipe = with_geometry(recipe, geometry)
        return dataclasses.replace(self, layout=layout, geometry=geometry, recipe=recipe, search_micro_batch=False)


def preflight(recipe: Recipe, resume: bool = False, processes: Optional[int] = None) -> Plan:
    """Every check a recipe can fail before compute is spent, and the plan the run then reads.

    ``processes``: how many processes the run has (default: the launcher's ``WORLD_SIZE``, 1 without one).
    """
    from dpo_accel.model.reference import resolve_mode
    from dpo_accel.model.speed import check_speed_options, on_gpu, resolve_model_dtype

    validate(recipe)  # load_recipe ran it; a recipe built in Python may not have
    objective = plan_loss(recipe.loss)
    check_speed_options(recipe)
    check_machine(recipe)
    mode = resolve_mode(recipe, objective.needs_reference)
    t = recipe.train
    geometry = Geometry(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                        processes or int(os.environ.get("WORLD_SIZE", "1")))
    checkpoint = check_output_dir(recipe, resume)
    search = t.auto_find_batch_size
    recipe = copy.deepcopy(recipe)  # the plan's recipe says what runs: model.dtype auto settled
    if checkpoint is not None:
        geometry = check_resume(recipe, geometry, checkpoint)
        search = False
        recipe = with_geometry(recipe, geometry)
    note = resolve_model_dtype(recipe, on_gpu())
    if note:
        log(note)
    return Plan(recipe, objective, mode, geometry, checkpoint, search)


def with_geometry(recipe: Recipe, geometry: Geometry) -> Recipe:
    """A copy of `recipe` whose batch keys are `geometry`'s."""
    recipe = copy.deepcopy(recipe)
    recipe.train.per_device_train_batch_size = geometry.per_device
    recipe.train.gradient_accumulation_steps = geometry.accumulation
    return recipe


# Trackers of train.report_to and the packages Accelerate imports for each (any one of them will do).
TRACKER_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
                    "comet_ml": ("comet_ml",), "clearml": ("clearml",), "aim": ("aim",), "dvclive": ("dvclive",)}


def check_machine(recipe: Recipe) -> None:
    """What this machine must have for the recipe: flash-attn for flash_attention_2, the packages of the
    trackers in train.report_to, a GPU for fp16 autocast (on the CPU it silently does nothing)."""
    import importlib.util

    from dpo_accel.model.speed import on_gpu

    gpu = on_gpu()
    if recipe.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise RecipeError("model.attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                              "installed: pip install flash-attn (CUDA GPUs only), or set model.attn_implementation: sdpa")
        if not gpu:
            raise RecipeError("model.attn_implementation flash_attention_2 runs on CUDA GPUs only and this run has "
                              "none; set model.attn_implementation: sdpa")
    missing = [name for name in recipe.train.report_to if name in TRACKER_PACKAGES
               and not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[name])]
    if missing:  # Accelerate drops a tracker it cannot import with a debug line only: the run would log nothing
        raise RecipeError(f"train.report_to names {', '.join(missing)}, which is not installed: pip install "
                          f"{' '.join(TRACKER_PACKAGES[m][0] for m in missing)}, or take it out of train.report_to")
    precision = recipe.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision == "fp16" and not gpu:
        source = "train.mixed_precision" if recipe.train.mixed_precision else "the launch config's mixed_precision"
        raise RecipeError(f"{source} is fp16 but this run is on the CPU (no CUDA GPU), where fp16 autocast does nothing; "
                          "set train.mixed_precision: bf16 (or no) on the CPU")


def check_writable(out: str) -> None:
    """`out` is a folder, or can be made one: no file in the way, the nearest existing folder above it
    writable (tried with an empty folder made and removed there, so nothing is left behind)."""
    import tempfile

    where = "train.output_dir '" + out + "'"
    if os.path.lexists(out) and not os.path.isdir(out):
        raise RecipeError(f"{where} is a file, not a folder; set train.output_dir to a folder path")
    above = os.path.abspath(out)
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise RecipeError(f"{where} cannot be made: '{above}' above it is a file, not a folder; "
                          "set train.output_dir to a path under a folder")
    try:
        if not os.access(above, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        os.rmdir(tempfile.mkdtemp(prefix=".dpo_accel_probe_", dir=above))
    except OSError as e:
        raise RecipeError(f"{where} cannot be written: '{above}' is not writable ({e.strerror or e}); set "
                          "train.output_dir to a folder you can write") from None


def check_output_dir(recipe: Recipe, resume: bool) -> Optional[str]:
    """Refuse to mix two runs in one folder, or a folder that cannot be written; returns the checkpoint a
    --resume continues (else None)."""
    out = recipe.train.output_dir
    check_writable(out)
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            if not holds_run(out):
                raise RecipeError(f"--resume: no complete checkpoint in '{out}/checkpoints' and no run started "
                                  "there; drop --resume to start one")
            # Killed before its first checkpoint: nothing to continue, so the run starts over in its folder.
            # (Iterative rounds keep their checkpoints per round: iterative.py says where it continues.)
            if not recipe.train.iterative_rounds:
                log(f"--resume: '{out}' has no complete checkpoint yet; starting the run from scratch there")
        else:
            check_complete(checkpoint)
        return checkpoint
    if holds_run(out):
        raise RecipeError(f"train.output_dir '{out}' already holds a run; pass --resume to continue it "
                          "or set train.output_dir to a new folder")
    return None


def holds_run(out: str) -> bool:
    """Whether a run started in `out` (it logged, checkpointed or saved its resolved recipe)."""
    return any(os.path.exists(os.path.join(out, name)) for name in ("metrics.jsonl", "checkpoints", "recipe.yaml"))


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        return json.load(f)


def _flat(sections: dict) -> dict:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def check_resume(recipe: Recipe, geometry: Geometry, checkpoint: str) -> Geometry:
    """Stop a --resume that would continue at another data position; note the changes that do not.

    Refused, naming the key and both values: the per-device batch, the accumulation, the number of
    processes, the seed, any data key (dataset, truncation, sampling). Allowed and noted: everything else
    (logging, eval, save interval, a larger max_steps, ...). With ``train.auto_find_batch_size`` the
    checkpoint's micro-batch is kept (no search on resume), and ``model.dtype: auto`` keeps the checkpoint's
    dtype (set in `recipe`). Returns the geometry to resume with.
    """
    state = read_state(checkpoint)
    with open(os.path.join(checkpoint, "recipe.yaml")) as f:
        saved = _flat(yaml.safe_load(f))
    t, where = recipe.train, f"the checkpoint {os.path.basename(checkpoint)}"
    if t.auto_find_batch_size and saved.get("train.auto_find_batch_size"):
        per, acc = saved["train.per_device_train_batch_size"], saved["train.gradient_accumulation_steps"]
        if per * acc == geometry.per_device * geometry.accumulation:
            geometry = dataclasses.replace(geometry, per_device=per, accumulation=acc)
            log(f"--resume: auto_find_batch_size keeps {where}'s micro-batch {per} x {acc} accumulation steps")
    if recipe.model.dtype == "auto" and saved.get("model.dtype", "auto") != "auto":
        recipe.model.dtype = saved["model.dtype"]  # auto keeps the dtype the checkpoint's weights trained in
    saved_processes = state.get("num_processes") or len(glob.glob(os.path.join(checkpoint, "random_states_*.pkl")))
    if saved_processes and saved_processes != geometry.processes:
        raise RecipeError(f"--resume: {where} was written by {saved_processes} process(es), this launch has "
                          f"{geometry.processes}; relaunch with {saved_processes} or start a new train.output_dir")
    current = _flat(recipe_to_dict(with_geometry(recipe, geometry)))
    changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    moved = [k for k in changed if k in POSITION_KEYS or (k.startswith("data.") and k not in NOT_POSITION)]
    kept = [k for k in changed if k in STATE_KEYS or k.startswith("lora.")]
    if moved or kept:  # one line naming every key, both values
        keys = moved + kept
        why = " and ".join(w for w, hit in (("continue at another data position", moved),
                                              ("be ignored by the restored optimizer and scheduler state", kept)) if hit)
        raise RecipeError(f"--resume: {', '.join(f'{k} is {changed[k][1]!r}' for k in keys)} but {where} was written "
                          f"with {', '.join(repr(changed[k][0]) for k in keys)}, which would {why}; "
                          f"set {'it' if len(keys) == 1 else 'them'} back or start a new train.output_dir")
    step = int(state["global_step"])
    if 0 < t.max_steps < step:
        raise RecipeError(f"--resume: train.max_steps {t.max_steps} is below {where}'s step {step}; "
                          f"raise it to {step} or more")
    if changed:
        log("--resume: changed since the checkpoint (the data position is the same): "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    return geometry


def check_resume_data(plan: Plan, train_fingerprint: str, steps_per_epoch: int) -> None:
    """After the data are built: the tokenised training split and its steps per epoch must be the
    checkpoint's (a dataset file edited in place, another tokenizer)."""
    if plan.resume_from is None:
        return
    state = read_state(plan.resume_from)
    saved = state.get("train_fingerprint")
    if saved is not None and saved != train_fingerprint:
        raise RecipeError(f"--resume: the tokenised training data (fingerprint {train_fingerprint}) are not the "
                          f"ones the checkpoint was trained on ({saved}); restore them or start a new train.output_dir")
    if int(state["steps_per_epoch"]) != steps_per_epoch:
        raise RecipeError(f"--resume: an epoch is {steps_per_epoch} steps but {state['steps_per_epoch']} in the "
                          "checkpoint (the training data changed); restore them or start a new train.output_dir")
