"""Speed and memory options around the policy: the dtype of the frozen weights (``model.dtype: auto``),
torch.compile of the decoder, QLoRA (4-bit base) and the largest micro-batch that fits, with gradient
accumulation keeping the global batch.

Each option is a recipe key (see recipe.py) and is checked before any compute is spent:

    check_speed_options(recipe)          # one-line RecipeError for an option this machine cannot run
    resolve_model_dtype(recipe, gpu)     # model.dtype auto -> float32 or bfloat16, and why
    bnb_4bit_config(recipe.model)        # the BitsAndBytesConfig that loading.load_causal_lm passes on
    apply_speed_options(accelerator, recipe, logps_model, train_dataset, pad_token_id, with_reference)
                                         # compile the decoder, then search the micro-batch; returns it (the setup
                                         # settles it into the plan before recipe.yaml is written)

The options that need no code of their own live elsewhere: ``model.gradient_checkpointing``
(non-reentrant, set in model.loading.load_policy; it works through the lean log-prob path, which calls the
decoder body directly), ``train.prefix_sharing``, ``train.padding_free`` and ``train.logps_chunk_size``
(logps.py), ``train.mixed_precision`` (Accelerate's autocast) and ``data.group_by_length`` (data.py).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Callable, Optional

import torch

from dpo_accel.outputs.console import log
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import ModelConfig, Recipe


# ------------------------------------------------------------------------------------------- checks

def _cpp_compiler() -> Optional[str]:
    """The C++ compiler TorchInductor would use on CPU (it honours $CXX), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_speed_options(recipe: Recipe, cuda: Optional[bool] = None) -> None:
    """Refuse, with one line saying what to change, a speed option this machine cannot run.

    ``cuda``: whether a CUDA device will be used (default: ``torch.cuda.is_available()``).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    m, t = recipe.model, recipe.train
    if m.load_in_4bit:
        if not recipe.lora.use_peft:
            raise RecipeError("model.load_in_4bit (QLoRA) trains a LoRA adapter on frozen 4-bit weights; "
                              "set lora.use_peft: true")
        if not cuda:
            raise RecipeError("model.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not "
                              "run on this CPU-only machine; set model.load_in_4bit: false")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError("model.load_in_4bit needs bitsandbytes: pip install bitsandbytes "
                              "(or set model.load_in_4bit: false)")
    if t.torch_compile_backend is not None and not t.torch_compile:
        raise RecipeError("train.torch_compile_backend is set but train.torch_compile is false; "
                          "set train.torch_compile: true or drop the backend")
    if t.torch_compile:
        backend = t.torch_compile_backend or "inductor"
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise RecipeError(f"train.torch_compile_backend '{backend}' is not a torch.compile backend "
                              f"(known: {', '.join(sorted(known))})")
        if backend == "inductor" and not cuda and _cpp_compiler() is None:
            raise RecipeError("train.torch_compile on CPU needs a C++ compiler for TorchInductor (g++ or clang++, "
                              "or $CXX); install one or set train.torch_compile: false")


# ------------------------------------------------------------------------------------ weight dtype

def on_gpu() -> bool:
    """Whether the run gets a GPU (CUDA, XPU or Apple MPS), not a launch forced onto the CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return False
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or torch.backends.mps.is_available())


def cpu_flags() -> set:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def bf16_matrix_units(gpu: bool, flags: Optional[set] = None) -> Optional[str]:
    """The name of the device's bf16 matrix units, or None where bf16 matmuls would be emulated: CUDA from
    compute capability 8.0 (Ampere) on; a CPU with AMX-BF16 or AVX512-BF16. Other GPUs (XPU, MPS) count
    as none, so they keep float32 unless asked."""
    if gpu:
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
            return f"{torch.cuda.get_device_name()} bf16 tensor cores"
        return None
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
                 if flag in flags), None)


def adapter_only(recipe: Recipe) -> bool:
    """Whether every weight the run trains is a LoRA adapter's, so the base is frozen: LoRA with no
    ``lora_modules_to_save`` and not a reward model (its new score head trains in full)."""
    return bool(recipe.lora.use_peft and not recipe.lora.lora_modules_to_save
                and recipe.loss.loss_type != "bradley_terry")


def auto_dtype(frozen_base: bool, units: Optional[str]) -> tuple[str, str]:
    """(dtype, why) that ``model.dtype: auto`` means on a device with bf16 matrix `units` (None: none).
    Frozen weights go to bfloat16 where the device multiplies it natively: the base under a LoRA (or QLoRA)
    adapter (`frozen_base`, see `adapter_only`), which is also the adapter-off reference. The adapter and the
    optimizer state stay float32 (peft keeps adapter weights float32 on a 16-bit base), as the peers load
    them. Weights that train in full keep float32 master weights; a copied reference follows the policy, so
    the rewards start at exactly 0."""
    if not frozen_base:
        return "float32", "weights that train in full keep float32 master weights"
    if units is None:
        return "float32", "no bf16 matrix units on this device"
    return "bfloat16", f"frozen base weights in bf16 on {units}; LoRA adapter and optimizer state float32"


def resolve_model_dtype(recipe: Recipe, gpu: bool) -> Optional[str]:
    """Settle ``model.dtype: auto`` in `recipe` (in place) for the run's device; returns the start-up note,
    or None when the recipe named a dtype."""
    if recipe.model.dtype != "auto":
        return None
    recipe.model.dtype, why = auto_dtype(adapter_only(recipe), bf16_matrix_units(gpu))
    return f"model.dtype auto -> {recipe.model.dtype} ({why})"


# -------------------------------------------------------------------------------------------- QLoRA

def bnb_4bit_config(cfg: ModelConfig):
    """QLoRA's quantisation (Dettmers et al. 2023): NF4 weights, double-quantised constants, matmuls in
    bfloat16 (float16 when the model is loaded in float16). Only the frozen base is quantised; the LoRA
    adapter and the norms stay in floating point (peft.prepare_model_for_kbit_training)."""
    from transformers import BitsAndBytesConfig

    compute = torch.float16 if cfg.dtype == "float16" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


# ------------------------------------------------------------------------------------ torch.compile

def compile_decoder(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """torch.compile the decoder body in place and return it.

    The decoder (embeddings, layers, final norm) is what both log-prob paths call; the chunked LM head
    stays eager, as its chunks are few and their count changes with the batch. ``Module.compile`` keeps
    the module and its parameter names (no ``_orig_mod.`` prefix in checkpoints). Shapes are dynamic
    from the start, since every batch has its own length (and a packed one its own total).
    """
    from dpo_accel.model.logps import PreferenceLogpsModel, unwrap_decoder

    model = getattr(model, "module", model)  # DDP
    decoder = unwrap_decoder(model.model if isinstance(model, PreferenceLogpsModel) else model).get_decoder()
    decoder.compile(backend=backend or "inductor", dynamic=True)
    return decoder


# ----------------------------------------------------------------------------- micro-batch search

def micro_batch_candidates(total: int) -> list[int]:
    """Divisors of ``total`` from largest to smallest: the micro-batch sizes that keep
    micro x accumulation == total exactly (e.g. 12 -> 12, 6, 4, 3, 2, 1)."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    return [d for d in range(total, 0, -1) if total % d == 0]


def find_micro_batch(try_step: Callable[[int], None], total: int) -> int:
    """The largest divisor of ``total`` for which ``try_step(micro)`` runs without running out of memory.

    Accelerate's ``find_executable_batch_size`` does the retrying (it recognises CUDA, XPU, MPS and CPU
    allocator out-of-memory errors and clears the device cache between tries); the schedule here walks
    down the divisors of ``total`` instead of multiplying by 0.9, so the global batch stays exact.
    Any other error propagates unchanged.
    """
    from accelerate.utils import find_executable_batch_size

    candidates = iter(micro_batch_candidates(total)[1:])

    def reduce() -> int:
        return next(candidates, 0)

    @find_executable_batch_size(starting_batch_size=total, reduce_batch_size_fn=reduce)
    def attempt(micro: int) -> int:
        try_step(micro)
        return micro

    try:
        return attempt()
    except RuntimeError as e:
        if "No executable batch size found" in str(e):
            raise RecipeError("train.auto_find_batch_size: even a micro-batch of 1 pair runs out of memory; "
                              "lower data.max_length, set model.gradient_checkpointing: true or use a smaller "
                              "model") from None
        raise


def _worst_case_rows(dataset, n: int, layout: str = "concat") -> list:
    """The ``n`` longest rows (by the width the decoder sees, see data.sequence_lengths), cycled when the
    split is smaller."""
    from dpo_accel.data.collate import sequence_lengths

    lengths = sequence_lengths(dataset, "shared" if layout == "packed_shared" else layout)  # c + r - s per pair
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [dataset[int(order[i % len(order)])] for i in range(n)]


def probe_micro_batch(accelerator, logps_model: torch.nn.Module, dataset, pad_token_id: int, total: int,
                      with_reference: bool = True) -> int:
    """The largest micro-batch (a divisor of ``total`` pairs) whose worst-case training step fits.

    Each try runs the step's memory peak on the longest rows of ``dataset``: the policy forward with
    gradients, a no-grad forward standing in for the reference (``with_reference``), the backward, and
    two optimizer-state tensors per trainable parameter (AdamW's). Weights are not changed, gradients
    are dropped and the RNG state is restored, so a run with the search trains exactly like one given
    the found sizes. Every process must call it; all get the smallest size any process found.
    """
    from dpo_accel.data.collate import PreferenceCollator

    device = accelerator.device
    logps_model.to(device)
    was_training = logps_model.training
    logps_model.train()
    params = [p for p in logps_model.parameters() if p.requires_grad]
    collator = PreferenceCollator(pad_token_id)
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def try_step(micro: int) -> None:
        batch = {k: v.to(device) for k, v in collator(_worst_case_rows(dataset, micro, logps_model.layout)).items()}
        try:
            with accelerator.autocast():
                out = logps_model(**batch)
                if with_reference:
                    with torch.no_grad():
                        logps_model(**batch)
                loss = out["chosen_logps"].sum() + (out["rejected_logps"].sum() if "rejected_logps" in out else 0.0)
            loss.backward()
            states = [torch.zeros_like(p) for p in params for _ in range(2)]  # AdamW's exp_avg, exp_avg_sq
            del states
        finally:
            for p in params:
                p.grad = None

    try:
        micro = find_micro_batch(try_step, total)
    finally:
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        logps_model.train(was_training)
    if accelerator.num_processes > 1:
        micro = int(accelerator.gather(torch.tensor([micro], device=device)).min())
    return micro


# ---------------------------------------------------------------------------------------- training

def apply_speed_options(accelerator, recipe: Recipe, logps_model: torch.nn.Module, train_dataset,
                        pad_token_id: int, with_reference: bool = True, search: Optional[bool] = None) -> Optional[int]:
    """What a policy run (loops.policy_run.settle) runs between building the PreferenceLogpsModel and the loaders.

    ``train.torch_compile``: compile the decoder (the first steps then include compilation time).
    ``train.auto_find_batch_size`` (or `search`; a resumed run keeps its checkpoint's micro-batch): return
    the largest micro-batch that fits; the accumulation that keeps their product, the pairs per process
    per optimizer step, is the caller's (``plan.Plan.settled``). None when there is no search.
    """
    t = recipe.train
    if t.torch_compile:
        compile_decoder(logps_model, t.torch_compile_backend)
    if not (t.auto_find_batch_size if search is None else search):
        return None
    total = t.per_device_train_batch_size * t.gradient_accumulation_steps
    micro = probe_micro_batch(accelerator, logps_model, train_dataset, pad_token_id, total, with_reference)
    log(f"auto_find_batch_size: micro-batch {micro} pairs x {total // micro} accumulation "
        f"steps = {total} pairs per process per optimizer step")
    return micro
