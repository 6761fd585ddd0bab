"""Where the frozen reference model lives under each Accelerate backend, and what each backend costs.

The policy is placed by ``accelerator.prepare``; the reference is not (a prepared frozen model is
DDP-wrapped, which DDP refuses, and it would be saved into every checkpoint). It follows the policy's
sharding instead:

| backend (``accelerator.distributed_type``)   | reference copy                                            |
| --- | --- |
| NO, MULTI_GPU / MULTI_CPU (DDP), ZeRO-0/1/2  | a frozen replica on each device, never wrapped            |
| FSDP with ``fsdp_version: 2``                | sharded like the policy: ``fully_shard`` per layer + root |
| DeepSpeed ZeRO-3                             | sharded by ``deepspeed.initialize``, run's stage-3 config |

A LoRA reference is the policy with its adapters switched off and a precomputed reference holds no
model, so both follow the policy's placement by construction and need nothing from this module.

    accelerate launch --config_file accelerate_configs/fsdp2.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_full.yaml
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch

from dpo_accel.outputs.console import log
from dpo_accel.config.errors import RecipeError


def backend_name(accelerator) -> str:
    """'single', 'ddp', 'fsdp1', 'fsdp2', 'zero0' .. 'zero3' (or the distributed type, lower-cased)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return "single"
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{zero_stage(accelerator)}"
    if kind.name.startswith("MULTI_"):
        return "ddp"
    return kind.name.lower()


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def check_launch(accelerator, processes: int) -> None:
    """The launch checks that need the Accelerator: the backend the launch config asked for, and the
    process count the plan was made for (``plan.Geometry.processes``)."""
    check_backend(accelerator)
    if accelerator.num_processes != processes:
        raise RecipeError(f"Accelerate runs {accelerator.num_processes} process(es) but the launcher's WORLD_SIZE "
                          f"says {processes}; launch with accelerate launch or torchrun, which set both")


def check_backend(accelerator) -> None:
    """Stop when the launch config asked for FSDP or DeepSpeed but Accelerate runs something else.

    Accelerate 1.15 turns an FSDP or DeepSpeed launch on CPU-only processes into plain DDP (MULTI_CPU),
    with no message: the run would silently hold a full replica per process. Shapes: none.
    """
    from accelerate.utils import DistributedType

    wanted = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
              if os.environ.get(env, "false").lower() == "true"]
    got = accelerator.distributed_type
    if wanted and got not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise RecipeError(
            f"the launch config asks for {wanted[0]} but Accelerate runs {got.value} on {accelerator.device.type} "
            f"(FSDP and DeepSpeed need GPUs); on CPU launch with accelerate_configs/cpu_two_process.yaml")


@contextlib.contextmanager
def whole_weights(module: torch.nn.Module):
    """Every weight of `module` whole on each process while inside: transformers partitions a model for
    ZeRO-3 as it loads it, so a forward before ``accelerator.prepare`` (the start-up self-check of the
    log-prob path) needs the partitions gathered; every process must enter. A no-op for anything else."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def reference_load_device(accelerator) -> torch.device:
    """Where to load a reference copy: the CPU when it is about to be sharded (only the shards then
    reach the accelerator; no full copy per device), else this process's device."""
    if backend_name(accelerator) in ("fsdp2", "zero3"):
        return torch.device("cpu")
    return accelerator.device


def place_reference(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Put a frozen reference (a `PreferenceLogpsModel` around an HF causal LM) where the policy's
    backend needs it; returns the module to call as ``module(**batch)`` (an FSDP2 module or a DeepSpeed
    engine when sharded). The module is in eval mode with no parameter requiring a gradient.
    """
    backend = backend_name(accelerator)
    module.eval().requires_grad_(False)
    if backend == "fsdp2":
        placed = shard_reference_fsdp2(module, accelerator)
    elif backend == "zero3":
        placed = deepspeed_reference(module, accelerator)
    else:  # single, DDP, FSDP1, ZeRO-0/1/2: a replica; ZeRO-1/2 keep full weights on every device anyway
        placed = module.to(device=accelerator.device, dtype=_deepspeed_dtype(accelerator))
    local, total = local_parameter_count(placed)
    log(f"reference placement: {describe(backend)} on each of {accelerator.num_processes} "
        f"process(es), {local / 1e6:.2f}M of {total / 1e6:.2f}M parameters on process 0")
    return placed


def describe(backend: str) -> str:
    if backend == "fsdp2":
        return "sharded with FSDP2 (fully_shard per decoder layer + root)"
    if backend == "zero3":
        return "sharded with DeepSpeed ZeRO-3"
    return "frozen replica"


def local_parameter_count(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters held by this process, parameters of the whole model) for replicas, FSDP2 DTensors and
    DeepSpeed ZeRO-3 partitions (whose ``ds_numel`` is the full size)."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "to_local"):  # FSDP2 DTensor shard
            local += p.to_local().numel()
            total += p.numel()
        elif hasattr(p, "ds_numel"):  # ZeRO-3 partition
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def decoder_layers(module: torch.nn.Module, class_names: Optional[list] = None) -> list[torch.nn.Module]:
    """The modules to shard one by one: instances of `class_names`, else of the HF model's
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), in definition order."""
    names = set(class_names or [])
    if not names:
        for sub in module.modules():
            names.update(getattr(sub, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:
        raise RecipeError(f"no decoder layer of class {sorted(names) or '(none named)'} in the reference model; "
                          "set fsdp_config.fsdp_transformer_layer_cls_to_wrap to the model's layer class")
    return layers


def shard_reference_fsdp2(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen reference with FSDP2 like accelerate shards the policy: each decoder layer, then the
    root (embeddings, final norm and LM head). Mesh, mixed-precision and offload policies are the
    policy's, so both models compute in the same precision. Layers free their gathered weights after
    their forward (no backward ever needs them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    kwargs = {"mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
              "offload_policy": plugin.cpu_offload}
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and accelerator.parallelism_config is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    for layer in decoder_layers(module, plugin.transformer_cls_names_to_wrap):
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    fully_shard(module, **kwargs)
    return module.eval()


def deepspeed_config_for_reference(train_config: dict, hidden_size: Optional[int]) -> dict:
    """The training run's DeepSpeed config made inference-only: no optimizer or scheduler, ZeRO stage
    kept (3 shards the parameters), bucket sizes still set to "auto" resolved from the hidden size as
    transformers does. Returns a new dict; `train_config` is not changed."""
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    if hidden_size:
        autos = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in autos.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    for key in ("offload_optimizer",):  # an optimizer offload means nothing without an optimizer
        zero.pop(key, None)
    return config


def deepspeed_reference(module: torch.nn.Module, accelerator):
    """Shard a frozen reference with DeepSpeed ZeRO-3 (the training config's stage-3 section); returns
    the engine, called as ``engine(**batch)``."""
    try:
        import deepspeed
    except ImportError as e:
        raise RecipeError("DeepSpeed ZeRO-3 shards the reference model through the deepspeed package, which is "
                          "not installed: pip install deepspeed (or use LoRA, or reference.mode: precomputed)") from e
    hidden = getattr(getattr(module, "model", module).config, "hidden_size", None)
    config = deepspeed_config_for_reference(accelerator.state.deepspeed_plugin.deepspeed_config, hidden)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def _deepspeed_dtype(accelerator) -> Optional[torch.dtype]:
    """DeepSpeed runs the policy in its own bf16/fp16 weights without autocast; a replica reference must
    run in the same dtype or policy and reference differ before the first step."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return None


# ------------------------------------------------------------------------------------------ export

def is_sharded(model: torch.nn.Module) -> bool:
    """True when this process holds only shards of `model`'s weights (FSDP2 DTensors, ZeRO-3 partitions)."""
    return any(hasattr(p, "to_local") or hasattr(p, "ds_id") for p in model.parameters())


def export_from_copy(accelerator, model: torch.nn.Module) -> bool:
    """True when the gathered state dict is not the model's own tensors, so the final export must go
    through `gathered_copy`: a sharded model (FSDP2, ZeRO-3) or any DeepSpeed run (ZeRO-1/2 hand back
    clones, which would save tied weights twice)."""
    from accelerate.utils import DistributedType

    return is_sharded(model) or accelerator.distributed_type == DistributedType.DEEPSPEED


def gathered_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of a sharded HF (or peft) model holding `state_dict`, the full weights that
    ``accelerator.get_state_dict`` gathered onto the main process (keys as ``model.state_dict()``).

    Saving or merging through the sharded module would need every process; saving the gathered dict as
    is would write tied weights twice (the gather returns the embedding and the LM head as separate
    tensors). The copy is built on the meta device and takes the gathered tensors as they are, then its
    weights are tied again, so `save_pretrained` and `merge_and_unload` behave as on one device.
    """
    peft = hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    with torch.device("meta"), one_process_zero3_off():
        plain = type(base)._from_config(base.config)  # the same head: a causal LM, or a reward model's classifier
        if peft:
            from peft import get_peft_model

            name = model.active_adapter
            plain = get_peft_model(plain, copy.deepcopy(model.peft_config[name]), adapter_name=name)
    _, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    (plain.get_base_model() if peft else plain).tie_weights()
    buffers = dict(model.named_buffers())  # never sharded: rotary tables and the like, on every process
    for name, buffer in plain.named_buffers():
        if buffer.is_meta and name in buffers:
            module, _, leaf = name.rpartition(".")
            plain.get_submodule(module)._buffers[leaf] = buffers[name].detach().to("cpu", copy=True)
    still_meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"the gathered state dict does not fit the model: unexpected {unexpected[:3]}, "
                           f"missing {still_meta[:3]}")
    return plain.eval()


@contextlib.contextmanager
def one_process_zero3_off():
    """Build or run a plain model on one process even while a ZeRO-3 run is configured: transformers would
    otherwise partition a new model with `deepspeed.zero.Init`, and `generate` would sync every decoding
    step with the other processes (``synced_gpus``): collectives that only the main process would enter."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


# ------------------------------------------------------------------------------------ memory plan

@dataclass
class MemoryPlan:
    """Bytes per device of the persistent training state (no activations, no temporary gathers)."""
    weights: float
    gradients: float
    optimizer: float
    reference: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference


def memory_per_device(backend: str, processes: int, params: int, trainable: int, reference: str,
                      weight_bytes: int = 4, trained_bytes: int = 4) -> MemoryPlan:
    """Computed (not measured) state bytes per device for DPO with AdamW.

    Args:
        backend: 'single', 'ddp', 'fsdp2', 'zero2' or 'zero3'.
        processes: data-parallel processes the state is sharded over (FSDP2, ZeRO).
        params: parameters of the base model; trainable: parameters that train (all, or the LoRA ones).
        reference: 'copy' (a second model), 'adapter_off' or 'precomputed' (no second model).
        weight_bytes: bytes per weight as loaded (4 for float32, the recipes' model.dtype).
        trained_bytes: bytes per trainable weight: 4 for a LoRA adapter (always float32) or float32 weights,
            2 where full fine-tuning trains bf16 weights (their gradients and moments are bf16 too).

    Accounting: AdamW keeps two moments in the trained weights' dtype (8 B per float32 parameter). DDP keeps a gradient
    bucket copy beside the gradients (gradient_as_bucket_view off, accelerate's default). FSDP2 shards
    weights, float32 gradients, moments and the reference 1/n. DeepSpeed with bf16 holds bf16 weights,
    a float32 master copy of the trainable ones, bf16 gradients; ZeRO-2 shards master, moments and
    gradients, ZeRO-3 the weights and the reference too.
    """
    n = max(processes, 1)
    frozen = params - trainable
    second = params if reference == "copy" else 0
    if backend in ("single", "ddp"):
        buckets = trained_bytes * trainable if backend == "ddp" and n > 1 else 0
        return MemoryPlan(weight_bytes * params, trained_bytes * trainable + buckets, 2 * trained_bytes * trainable,
                          weight_bytes * second)
    if backend == "fsdp2":
        return MemoryPlan(weight_bytes * params / n, trained_bytes * trainable / n, 2 * trained_bytes * trainable / n,
                          weight_bytes * second / n)
    if backend == "zero2":
        return MemoryPlan(2 * params, 2 * trainable / n, (4 + 8) * trainable / n, 2 * second)
    if backend == "zero3":
        return MemoryPlan(2 * (trainable + frozen) / n, 2 * trainable / n, (4 + 8) * trainable / n, 2 * second / n)
    raise ValueError(f"unknown backend '{backend}' (single, ddp, fsdp2, zero2, zero3)")
