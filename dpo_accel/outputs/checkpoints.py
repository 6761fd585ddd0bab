"""Checkpoints that resume exactly (the final export is dpo_accel/outputs/export.py).

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus
``trainer_state.json`` (the optimizer step, the data position, the files written). With a frozen base
(LoRA) on one process or DDP, the model file holds the trainable weights only: the base is reloaded from
the recipe's source, and a fingerprint of it in the state file stops a resume on another base (SmolLM2
LoRA r16, measured: 597 MB -> 59 MB). FSDP2 and ZeRO-3 checkpoints keep their own sharded formats, base
included. A checkpoint is written to a temporary folder and renamed into place, so a run killed mid-save never leaves a half checkpoint that
``--resume`` would pick up; the oldest checkpoints beyond ``save_total_limit`` are removed only
after the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe, dump_recipe
from dpo_accel.outputs.files import publish, remove, temp_path

STATE_FILE = "trainer_state.json"


class RunStopped(RuntimeError):
    """The run cannot go on (not a recipe problem): one line for the user, exit code 3."""


class NonFiniteError(RunStopped):
    """Training reached non-finite values: too many non-finite steps in a row, or weights about to be saved."""


class SaveError(RunStopped):
    """A checkpoint or the export could not be written (a full disk); what was there before is kept."""


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def save_trainable_only(accelerator) -> bool:
    """Make ``save_state`` write each model's trainable weights only, where some are frozen (LoRA: the
    adapter, not the base). Not under FSDP / DeepSpeed, whose own formats save the full sharded state.
    Returns whether the hook is on."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = trainable_names(model)
            if len(keep) < sum(1 for _ in model.named_parameters(remove_duplicate=False)):
                for key in [k for k in state if k not in keep]:
                    del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)
    return True


def base_fingerprint(model) -> str:
    """A digest of the frozen weights (names, shapes, float64 sums of values and squares): the base a LoRA
    checkpoint applies to. Cheap enough for every start (about a second for 135M values)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                v = p.detach().double()
                digest.update(f"{name}{tuple(p.shape)}{float(v.sum()):.10e}{float((v * v).sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def check_finite(accelerator, model, what: str) -> None:
    """Refuse to write `what` (a checkpoint, the export) from weights holding a NaN or an infinity: every
    process counts its (local shard of the) trainable weights, one all-reduce, all raise together."""
    import torch

    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        if p.requires_grad:  # frozen weights are the loaded ones
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 shards
            local = getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else local  # ZeRO-3
            bad += (~torch.isfinite(local.detach())).sum().to(bad.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad):
        raise NonFiniteError(f"{int(bad)} trainable weights are NaN or infinite; {what} not written (the previous "
                             "one is kept); lower train.learning_rate or loss.beta")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first; the step is read from the state file."""
    root = checkpoint_dir(output_dir)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            state = os.path.join(root, name, STATE_FILE)
            if name.startswith("checkpoint-") and os.path.isfile(state):
                found.append((int(read_state_file(state)["global_step"]), os.path.join(root, name)))
    return sorted(found)


def read_state_file(path: str) -> dict:
    try:
        with open(path) as f:
            state = json.load(f)
        int(state["global_step"])
        return state
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"{path} is damaged ({type(e).__name__}: {e}); remove its checkpoint folder to resume "
                          "from the one before") from None


# What --resume reads, checked where the state file lists no files (a checkpoint written by an older version,
# or copied by hand): the recipe always; the weights the state file says it holds, in any of Accelerate's
# layouts (model*.safetensors, pytorch_model*.bin, FSDP's pytorch_model_fsdp_0, DeepSpeed's pytorch_model/);
# next to plain (not FSDP / DeepSpeed) weights, the optimizer and the scheduler (the one object registered for
# checkpointing) that load_state reads.
ALWAYS_READ = ("recipe.yaml",)
PLAIN_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
READ_WITH_PLAIN_WEIGHTS = ("optimizer.bin", "custom_checkpoint_0.pkl")


def check_complete(path: str) -> None:
    """Every file the checkpoint was written with is there at its size (``files`` in its state file; without
    that list, the files --resume reads); a one-line RecipeError naming the first that is not, before anything
    in the run folder is touched."""
    state = read_state_file(os.path.join(path, STATE_FILE))
    listed = state.get("files") or {}
    needed: dict = {**dict.fromkeys(ALWAYS_READ), **listed}
    if not listed:
        names = os.listdir(path)
        if state.get("weights") == "trainable" or any(name in names for name in PLAIN_WEIGHTS):
            needed.update(dict.fromkeys(READ_WITH_PLAIN_WEIGHTS))
        if state.get("weights") and not any(name.startswith(("model", "pytorch_model")) for name in names):
            raise damaged(path, "its weights (" + " or ".join(PLAIN_WEIGHTS) + ") are missing")
        if state.get("weights") == "trainable":
            needed["model.safetensors"] = None  # the trainable weights, in the one file check_trainable_file reads
    for name, size in needed.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full) or (size is not None and os.path.getsize(full) != size):
            found = "missing" if not os.path.isfile(full) else f"{os.path.getsize(full)} bytes, written with {size}"
            raise damaged(path, f"{name} is {found}")


def damaged(path: str, what: str) -> RecipeError:
    return RecipeError(f"--resume: checkpoint {os.path.basename(path)} is damaged: {what}; remove that checkpoint "
                       "folder to resume from the one before")


def manifest(path: str) -> dict[str, int]:
    """{relative path: size} of every file under `path`."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(files.items()))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, output_dir: str, state: dict, recipe: Recipe, total_limit: int, model=None) -> str:
    """Save a resumable checkpoint for `state['global_step']`; every process must call this. With `model`
    (the prepared policy), weights holding a NaN or an infinity are refused before anything is written."""
    step = int(state["global_step"])
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"checkpoint-{step:07d}")
    tmp = temp_path(final)  # one name on every process: all of them write into it
    if model is not None:
        check_finite(accelerator, model, f"checkpoint-{step:07d}")
    if accelerator.is_main_process:
        remove(tmp)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    failed = None
    try:
        accelerator.save_state(tmp)
    except OSError as e:  # a full disk: every process must hear of it before the next barrier
        failed = e
    failed = _agree(accelerator, failed)
    accelerator.wait_for_everyone()  # every rank has written its RNG / shard files before the rename
    if accelerator.is_main_process and failed is None:
        try:
            dump_recipe(recipe, os.path.join(tmp, "recipe.yaml"))
            state = {**state, "files": manifest(tmp)}  # what --resume checks is still there
            with open(os.path.join(tmp, STATE_FILE), "w") as f:  # written last: marks the folder complete
                json.dump(state, f, indent=2)
        except OSError as e:
            failed = e
    if failed is not None:
        if accelerator.is_main_process:
            written = sum(manifest(tmp).values()) if os.path.isdir(tmp) else 0
            remove(tmp)
            raise SaveError(space_message(f"checkpoint-{step:07d}", root, failed, output_dir, written))
        raise SaveError(f"checkpoint-{step:07d} not written (see the main process)")
    if accelerator.is_main_process:
        publish(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-max(total_limit, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_trainable_file(path: str, model) -> None:
    """The policy's weights file holds exactly its trainable weights (what strict=False would not check)."""
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise damaged(path, "model.safetensors is missing")
    with safe_open(file, framework="pt") as f:
        saved = set(f.keys())
    expected = trainable_names(model)
    if saved != expected:
        odd = sorted(saved ^ expected)
        raise RecipeError(f"--resume: {os.path.basename(path)} holds other trainable weights than this run builds "
                          f"({len(odd)} differ, e.g. {odd[0]}); set lora.* back or start a new train.output_dir")


def _agree(accelerator, error: Optional[OSError]) -> Optional[OSError]:
    """Every process learns whether any failed (one all-reduce), so none waits alone at a barrier."""
    if accelerator.num_processes == 1:
        return error
    import torch

    flag = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), reduction="sum")
    if float(flag) and error is None:
        error = OSError(0, "another process failed to write")
    return error


def space_message(what: str, folder: str, error: OSError, output_dir: str, written: int, needed: int = 0) -> str:
    """One line: what failed, why, about how much space it needs (the last checkpoint's size, what was
    written before the failure, or `needed`) and how much is free."""
    previous = list_checkpoints(output_dir) if not needed else []
    if previous:
        needed = sum(read_state_file(os.path.join(previous[-1][1], STATE_FILE)).get("files", {}).values())
    needed = max(needed, written)
    try:
        free = shutil.disk_usage(folder if os.path.isdir(folder) else output_dir).free
    except OSError:
        free = 0
    size = f"about {needed / 1e6:.0f} MB" if needed else "more space"
    return (f"{what} not written: {error.strerror or error} in {folder}; it needs {size}, {free / 1e6:.0f} MB free "
            f"(the previous checkpoint is kept); free some space or move train.output_dir, then rerun with --resume")


def load_checkpoint(accelerator, path: str, fingerprint: Optional[str] = None) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state. A checkpoint of the
    trainable weights only loads over the base just loaded from the recipe's source, whose `fingerprint`
    must be the one it was trained on."""
    state = read_state_file(os.path.join(path, STATE_FILE))
    try:
        if state.get("weights") == "trainable":
            saved = state.get("base_fingerprint")
            if saved and fingerprint and saved != fingerprint:
                raise RecipeError(f"--resume: the frozen base weights (fingerprint {fingerprint}) are not the ones "
                                  f"{os.path.basename(path)} was trained on ({saved}); restore "
                                  "model.model_name_or_path's weights or start a new train.output_dir")
            check_trainable_file(path, accelerator._models[0])
            accelerator.load_state(path, strict=False)  # the base is not in the file: it was loaded from its source
        else:
            accelerator.load_state(path)
    except FileNotFoundError as e:  # a file the state file did not list (check_complete checked those)
        name = os.path.basename(str(e.filename)) if e.filename else ""
        what = ("its weights (" + " or ".join(PLAIN_WEIGHTS) + ") are missing" if name in PLAIN_WEIGHTS
                else f"{name} is missing" if name
                else f"a file it needs is missing ({(str(e).strip() or type(e).__name__).splitlines()[0]})")
        raise damaged(path, what) from None
    return state
