"""The run before the run: what a recipe will do, on which data, and whether it fits, in seconds.

    python -m dpo_accel.inspect_recipe --recipe recipes/smollm2_arith_lora.yaml --gpu 24GB --gpu 80GB
    python -m dpo_accel.inspect_recipe --recipe recipes/smollm2_arith_lora.yaml \\
        --model-config model_configs/llama-2-7b.json --gpu 24GB     # a 7B-class model, same data

It reads the recipe (any --set applies), resolves the plan with ``preflight``, tokenises the data as
the run would (cached, so the run reuses it) and reads the model's config only: the parameter count
comes from the model built on the meta device, and the activation bytes from a forward of that meta
model (1 and 2 layers, so the per-layer term is exact for the family) under autograd's saved-tensor
hooks. No weight file is opened. What it prints:

  plan        objective, reference mode, layout, batch geometry, steps
  data        per split and source: kept / truncated / dropped, token-length percentiles; tokens the
              decoder runs per epoch per layout (padded vs real) and what prefix sharing saves
  estimate    per device (the CPU here, or each --gpu): weights, gradients + optimizer state (LoRA or
              full), reference, activations of the longest micro-batch with and without gradient
              checkpointing, the LM-head chunk; FLOPs per step; time per step and per run at --mfu of the
              GPU's dense bf16 peak; fits or not, and the first setting that makes it fit

Accounting (stated so it can be checked): state bytes are ``distributed.memory_per_device``; QLoRA keeps
frozen weights at 0.5 bytes plus 1/32 for block scales; activations count every tensor autograd saves
for backward once per storage, without the [T, T] attention scores that sdpa / flash attention never
store; with gradient checkpointing each layer keeps its input and one layer is live again in backward;
the LM head holds one chunk of [chunk, vocab] logits in the compute dtype plus two float32 copies (the
log-softmax and its gradient); under autocast with float32 weights, the bf16 cast of every decoder
weight that autograd keeps for the backward counts as an activation; a GPU adds 1 GiB for the CUDA
context and allocator; the CPU adds 0.75 x the saved activations for freed temporaries glibc's
allocator keeps (measured here, 2026-11-30: one bf16 forward + backward of the main job's longest
micro-batch in stacked rows, [16, 112], peaked 0.75 x its 1.65 GiB of saved tensors above weights +
saved tensors + LM-head chunk + LoRA state; the test then checks a run in the other layout). FLOPs: 2N per
token the decoder runs per forward (N = parameters that multiply, the input embedding excluded unless
tied; the LM head only at label positions) plus the attention's 2·d per causal query-key pair and
layer; backward one forward more (LoRA: activation gradients only) or two (full), a reference forward
where one runs, the decoder once more under checkpointing and the LM-head chunks always (checked
against torch's FLOP counter in tests/test_inspect.py).

A vision-language model (its config one ``AutoModelForImageTextToText`` maps, with a vision config) goes through
`dpo_accel.inspect_vision`: its processor tokenises the data as the run does, the data section adds image
tokens and vision-tower inputs (images or tiles) per pair, and the language-model tokens count the image
tokens. Parameters come from the whole meta model (tower + projector + language model), trainable from LoRA
on the language model (+ the projector with lora.train_projector); the activations above are the language
model's, traced from its text config at the longest micro-batch's width; the frozen tower's forward working
set (and what autograd saves for a trained projector) is added, and so are its FLOPs: 2 x tower parameters
per patch plus its attention, per input and forward, once per pair in the shared layout and twice in stacked
rows. A line gives the estimate with every pair at data.max_length.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import Recipe

GiB = 1024 ** 3
# Dense bf16 tensor-core peak assumed for a GPU of each memory size (TFLOP/s; the chip named is the
# assumption, printed with the estimate). --gpu 24GB:165 states another peak.
GPU_PEAK = {16: (65, "T4"), 24: (121, "L4"), 40: (312, "A100 40GB"), 48: (362, "L40S"), 80: (312, "A100 80GB"),
            94: (989, "H100 NVL"), 141: (989, "H200")}
CUDA_OVERHEAD = 1 * GiB
CPU_RETAINED = 0.75  # x saved activations: freed temporaries the CPU allocator keeps (see the module docstring)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Device:
    name: str
    memory: Optional[float]  # bytes; None: the CPU here (no limit checked)
    peak_flops: Optional[float]  # dense bf16 FLOP/s assumed
    chip: str = ""

    @property
    def gpu(self) -> bool:
        return self.memory is not None


def parse_gpu(text: str) -> Device:
    """'24GB' or '24GB:165' (memory, optionally dense bf16 TFLOP/s) -> Device."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*G(?:i)?B(?::(\d+(?:\.\d+)?))?", text.strip(), flags=re.I)
    if not m:
        raise RecipeError(f"--gpu '{text}' must look like 24GB or 24GB:165 (memory, optionally bf16 TFLOP/s)")
    size = float(m.group(1))
    if m.group(2):
        return Device(f"{m.group(1)}GB", size * GiB, float(m.group(2)) * 1e12, f"{m.group(2)} TFLOP/s stated")
    nearest = min(GPU_PEAK, key=lambda k: (abs(k - size), k))
    tflops, chip = GPU_PEAK[nearest]
    return Device(f"{m.group(1)}GB", size * GiB, tflops * 1e12, f"{chip}-class, {tflops} TFLOP/s bf16 assumed")


# ----------------------------------------------------------------------------------------- plan

def resolve_plan(recipe: Recipe) -> tuple:
    """(plan, note): ``preflight`` on a copy whose output folder is fresh (inspect runs beside finished runs
    too). A check only a GPU passes (QLoRA, flash-attn, fp16) is reported, not fatal: the plan is made with those
    settings switched off, then 4-bit weights and fp16 given back, so the estimate is for the GPUs named as the recipe
    asks (attention is estimated as sdpa's)."""
    import dataclasses

    from dpo_accel.config.plan import preflight

    probe = copy.deepcopy(recipe)
    probe.train.output_dir = os.path.join(tempfile.gettempdir(), f"dpo_accel_inspect_{os.getpid()}", "run")
    try:
        return preflight(probe, processes=1), None
    except RecipeError as e:
        if not any(word in str(e) for word in ("CUDA", "bitsandbytes", "flash-attn", "fp16")):
            raise
        probe.model.load_in_4bit = False
        probe.model.attn_implementation = "sdpa"
        probe.train.mixed_precision = "bf16" if recipe.train.mixed_precision == "fp16" else probe.train.mixed_precision
        plan = preflight(probe, processes=1)
        asked = copy.deepcopy(plan.recipe)
        asked.model.load_in_4bit = recipe.model.load_in_4bit
        asked.train.mixed_precision = recipe.train.mixed_precision
        return dataclasses.replace(plan, recipe=asked), f"this machine could not run it ({e}); planned as on a GPU"


# ----------------------------------------------------------------------------------------- model

def model_config(recipe: Recipe, config_path: Optional[str]):
    """The model's config (config.json only), from --model-config or the recipe's model."""
    from transformers import AutoConfig

    from dpo_accel.model.loading import resolve_model_path

    if config_path:
        path = config_path if os.path.isdir(config_path) else os.path.dirname(os.path.abspath(config_path))
        if os.path.isfile(config_path):
            from transformers import PretrainedConfig

            raw, _ = PretrainedConfig.get_config_dict(config_path)
            return AutoConfig.for_model(**raw)
        return AutoConfig.from_pretrained(path)
    path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    return AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)


def with_attention(config, recipe: Recipe):
    """The config with the attention implementation the run loads the model with (prefix sharing reads it)."""
    config._attn_implementation = recipe.model.attn_implementation or "sdpa"
    return config


def _meta_model(config, recipe: Recipe, layers: Optional[int] = None, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    config._attn_implementation = recipe.model.attn_implementation or "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32,
                                                 trust_remote_code=recipe.model.trust_remote_code)
    if recipe.lora.use_peft:
        from peft import LoraConfig, inject_adapter_in_model

        lora = recipe.lora
        model = inject_adapter_in_model(LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=0.0,
                                                   target_modules=lora.lora_target_modules), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


@dataclass
class ModelFacts:
    params: int  # the base model's parameters
    trainable: int  # LoRA parameters, or all
    matmul_params: int  # parameters that multiply per token (the input embedding only when tied)
    layers: int
    hidden: int
    vocab: int
    model_type: str


def model_facts(config, recipe: Recipe) -> ModelFacts:
    from dpo_accel.inspect_vision import memoised

    return memoised("facts", config, recipe, (), lambda: _model_facts(config, recipe))


def _model_facts(config, recipe: Recipe) -> ModelFacts:
    model = _meta_model(config, recipe)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    matmul = base + lora - (0 if tied else embed.numel())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelFacts(base, lora if recipe.lora.use_peft else base, matmul, text.num_hidden_layers,
                      text.hidden_size, text.vocab_size, config.model_type)


def saved_bytes(config, recipe: Recipe, rows: int, width: int, compute_dtype) -> tuple:
    """(bytes autograd saves for backward in the decoder body, of which per layer) for one micro-batch of
    [rows, width] tokens, from forwards of the meta model with 1 and 2 layers."""
    from dpo_accel.inspect_vision import memoised

    return memoised("saved", config, recipe, (rows, width, str(compute_dtype)),
                    lambda: _saved_bytes(config, recipe, rows, width, compute_dtype))


def _saved_bytes(config, recipe: Recipe, rows: int, width: int, compute_dtype) -> tuple:
    import torch

    def trace(layers: int) -> int:
        model = _meta_model(config, recipe, layers, compute_dtype).train()
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        seen: dict = {}
        kept = []

        def pack(t):
            kept.append(t)  # alive until the end, so no storage id is reused
            s = t.untyped_storage()
            scores = t.dim() >= 2 and t.shape[-1] == width and t.shape[-2] == width and width > 1
            if s._cdata not in weights and not (scores and config._attn_implementation != "eager"):
                seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
            return t

        ids = torch.zeros(rows, width, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            body = model.get_base_model() if hasattr(model, "get_base_model") else model
            getattr(body, body.base_model_prefix)(input_ids=ids)
        return sum(seen.values())

    config = copy.deepcopy(config)
    config._attn_implementation = recipe.model.attn_implementation or "sdpa"
    one, two = trace(1), trace(2)
    per_layer = two - one
    return (one - per_layer) + per_layer * model_layers(config), per_layer


def model_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.num_hidden_layers


# ------------------------------------------------------------------------------------------ data

@dataclass
class Batches:
    """The training micro-batches of one epoch in the sampler's order, as token counts per layout."""
    count: int
    real: int  # chosen + rejected tokens of every pair (a shared prompt counted twice, as TRL counts)
    labels: int  # answer tokens (the positions whose log-prob is computed)
    per_layout: dict  # layout -> tokens the decoder runs (padding included)
    longest: dict  # layout -> (rows, width) of the widest micro-batch
    tower_inputs: int = 0  # a VLM's vision-tower inputs (images or tiles) per epoch, once per pair
    image_tokens: int = 0  # its image tokens per epoch, once per pair
    tower_longest: int = 0  # the most tower inputs of one micro-batch, once per pair


def batch_tokens(tokenized, recipe: Recipe, processes: int = 1, images: Optional[tuple] = None) -> Batches:
    """Token counts of the epoch's micro-batches; `images`: a VLM's (image tokens, tower inputs) per training pair."""
    import numpy as np
    import pyarrow.compute as pc

    from dpo_accel.data.collate import LengthGroupedSampler, sequence_lengths

    t = recipe.train
    train = tokenized["train"]
    cols = [c for c in ("chosen_input_ids", "rejected_input_ids") if c in train.column_names]
    table = train.select_columns(cols).with_format("arrow")[:]
    c = pc.list_value_length(table.column(cols[0])).to_numpy().astype(np.int64)
    r = pc.list_value_length(table.column(cols[1])).to_numpy().astype(np.int64) if len(cols) > 1 else 0 * c
    shared = np.asarray(sequence_lengths(train, "shared"), dtype=np.int64)
    prompt = np.asarray(train["prompt_length"], dtype=np.int64)
    labels = int((c - prompt).sum() + ((r - prompt).sum() if len(cols) > 1 else 0))
    layout = "shared" if recipe.train.prefix_sharing is not False else "concat"
    if recipe.data.group_by_length:
        order = list(LengthGroupedSampler(sequence_lengths(train, layout), t.per_device_train_batch_size * processes,
                                          seed=t.seed))
    else:
        order = list(np.random.default_rng(t.seed).permutation(len(c)))
    b = t.per_device_train_batch_size
    out = {"concat": 0, "shared": 0, "packed": 0}
    longest = {"concat": (0, 0), "shared": (0, 0), "packed": (0, 0)}
    count = tower_longest = 0
    for start in range(0, len(order), b):
        idx = np.asarray(order[start:start + b])
        n = len(idx)
        if images is not None:
            tower_longest = max(tower_longest, int(images[1][idx].sum()))
        sizes = {"concat": (2 * n if len(cols) > 1 else n, int(np.maximum(c[idx], r[idx]).max())),
                 "shared": (n, int(shared[idx].max())), "packed": (1, int((c[idx] + r[idx]).sum()))}
        for key, (rows, width) in sizes.items():
            out[key] += rows * width
            if rows * width > longest[key][0] * longest[key][1]:
                longest[key] = (rows, width)
        count += 1
    tokens, inputs = (int(a.sum()) for a in images) if images is not None else (0, 0)
    return Batches(count, int((c + r).sum()), labels, out, longest, inputs, tokens, tower_longest)


# -------------------------------------------------------------------------------------- estimate

@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float
    activations_checkpointed: float
    lm_head: float
    overhead: float
    checkpointing: bool
    parts: dict = field(default_factory=dict)
    tower: float = 0.0  # a VLM's frozen vision tower: its forward working set
    projector: float = 0.0  # what autograd saves for a trained projector

    @property
    def total(self) -> float:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + self.reference + act + self.lm_head + self.overhead \
            + self.tower + self.projector


def compute_dtype(recipe: Recipe, device: Device) -> str:
    """The dtype activations are saved in: bf16/fp16 autocast, else the weights' dtype."""
    mp = recipe.train.mixed_precision
    if mp in ("bf16", "fp16"):
        return "bfloat16" if mp == "bf16" else "float16"
    if mp is None and device.gpu:
        return "bfloat16"  # accelerate_configs/gpu_single.yaml: bf16
    return recipe.model.dtype


def estimate(recipe: Recipe, facts: ModelFacts, config, mode: str, layout: str, batches: Batches, device: Device,
             backend: str = "single", processes: int = 1, vision=None) -> Estimate:
    """Bytes per device for `recipe` on `device` (see the module docstring for the accounting); `vision`: a VLM's
    `inspect_vision.VisionData` (`config` is then its language model's)."""
    import torch

    from dpo_accel.model.distributed import memory_per_device

    weight_bytes = DTYPE_BYTES[recipe.model.dtype]
    reference = "copy" if mode == "copy" else mode
    trained_bytes = 4 if recipe.lora.use_peft else weight_bytes  # a LoRA adapter is float32 whatever the base
    state = memory_per_device(backend, processes, facts.params, facts.trainable, reference, weight_bytes,
                              trained_bytes)
    weights = state.weights
    if recipe.model.load_in_4bit:
        frozen = facts.params - (facts.trainable if recipe.lora.use_peft else 0)
        weights = frozen * (0.5 + 1 / 32) + (facts.params - frozen) * weight_bytes
    dtype = compute_dtype(recipe, device)
    rows, width = batches.longest[layout]
    act, per_layer = saved_bytes(config, recipe, rows, width, getattr(torch, dtype))
    act_bytes = DTYPE_BYTES[dtype]
    # checkpointing: each layer keeps its input; one layer is live again during its backward
    act_gc = facts.layers * rows * width * facts.hidden * act_bytes + per_layer + (act - per_layer * facts.layers)
    if act_bytes < weight_bytes and not recipe.model.load_in_4bit:
        # autocast casts each decoder weight for its matmul and autograd keeps the cast for the backward
        casts = (facts.matmul_params - facts.vocab * facts.hidden - (facts.trainable if recipe.lora.use_peft else 0))
        act += casts * act_bytes
        act_gc += casts * act_bytes / facts.layers  # checkpointed: one layer's casts live at a time
    lm_head = lm_head_positions(recipe, facts.vocab) * facts.vocab * (act_bytes + 8)
    if device.gpu:
        overhead = CUDA_OVERHEAD
    else:  # glibc keeps freed temporaries: measured 0.75 x the saved activations on this CPU (module docstring)
        overhead = CPU_RETAINED * (act_gc if recipe.model.gradient_checkpointing else act)
    tower = projector = 0.0
    if vision is not None:
        from dpo_accel.inspect_vision import tower_bytes

        inputs = batches.tower_longest * (2 if layout == "concat" else 1)  # stacked rows repeat each pair's images
        tower, projector = tower_bytes(vision, recipe, inputs, dtype)
    return Estimate(weights, state.gradients, state.optimizer, state.reference, act, act_gc, lm_head,
                    overhead, recipe.model.gradient_checkpointing, {"rows": rows, "width": width, "dtype": dtype},
                    tower, projector)


def lm_head_positions(recipe: Recipe, vocab: int) -> int:
    """Label positions per LM-head chunk: train.logps_chunk_size, capped by train.logps_chunk_mb where the
    recipe has it (two float32 [chunk, V] buffers within that many MiB)."""
    positions = recipe.train.logps_chunk_size
    mb = getattr(recipe.train, "logps_chunk_mb", None)
    if mb:
        positions = min(positions, max(1, int(mb * 2 ** 20 // (8 * vocab))))
    return positions


def flops_per_step(recipe: Recipe, facts: ModelFacts, mode: str, batches: Batches, layout: str,
                   config, processes: int = 1, vision=None) -> float:
    """FLOPs one device runs per optimizer step. A forward is 2 FLOPs per multiplying parameter per token
    the decoder runs (the LM head only at label positions, as logps.py computes it) plus the attention's
    2·2·d per causal query-key pair; backward is one forward more for the activation gradients (frozen
    weights under LoRA) or two (full fine-tuning); a reference forward where one runs; a recomputed
    forward of the decoder under gradient checkpointing, and always of the LM head's chunks. A VLM (`vision`)
    adds its tower's and projector's FLOPs (`inspect_vision.tower_flops`)."""
    steps = max(batches.count, 1) / recipe.train.gradient_accumulation_steps
    tokens = batches.per_layout[layout] / steps
    labels = batches.labels / steps
    rows, width = batches.longest[layout]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = facts.vocab * facts.hidden
    attention = 2 * 2 * text.hidden_size * facts.layers * (width + 1) / 2  # per token: half of T keys (causal)
    body = (2 * (facts.matmul_params - head) + attention) * tokens
    passes = 1 + (1 if recipe.lora.use_peft else 2) + (1 if mode in ("copy", "adapter_off") else 0)
    checkpointed = 1 if recipe.model.gradient_checkpointing else 0
    # the LM head's chunks are checkpointed (logps.py): their forward runs again in backward
    total = body * (passes + checkpointed) + 2 * head * labels * (passes + 1)
    if vision is not None:
        from dpo_accel.inspect_vision import tower_flops, vision_params

        repeat = (2 if layout == "concat" else 1) / steps  # stacked rows repeat each pair's images
        forwards = 1 + (1 if mode in ("copy", "adapter_off") else 0)
        total += tower_flops(vision, vision_params(vision.config, recipe), batches.tower_inputs * repeat,
                             batches.image_tokens * repeat, forwards, recipe.lora.train_projector)
    return total


def fix_for(recipe: Recipe, fits) -> Optional[str]:
    """The first setting that makes `recipe` fit (``fits(recipe) -> bool``), else the shortest chain of
    them in the order gradient checkpointing, bf16 weights, precomputed reference, LoRA, QLoRA,
    micro-batch 1; None when even the chain does not fit."""
    t, m = recipe.train, recipe.model

    def setter(section: str, key: str, value):
        return f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}", \
            lambda r: setattr(getattr(r, section), key, value)

    gc = setter("model", "gradient_checkpointing", True) if not m.gradient_checkpointing else None
    bf16 = setter("model", "dtype", "bfloat16") if m.dtype == "float32" else None
    pre = setter("reference", "mode", "precomputed") if not recipe.lora.use_peft \
        and recipe.reference.mode in ("auto", "copy") else None
    lora = setter("lora", "use_peft", True) if not recipe.lora.use_peft else None
    qlora = setter("model", "load_in_4bit", True) if not m.load_in_4bit else None
    b = t.per_device_train_batch_size
    batches = []
    for smaller in [x for x in (b // 2, b // 4, 1) if 0 < x < b]:
        acc = t.gradient_accumulation_steps * b // smaller
        batches.append((f"train.per_device_train_batch_size={smaller} train.gradient_accumulation_steps={acc}",
                        lambda r, s=smaller, a=acc: (setattr(r.train, "per_device_train_batch_size", s),
                                                     setattr(r.train, "gradient_accumulation_steps", a))))
    singles = [o for o in [gc] + batches + [bf16, pre, lora] if o] + ([qlora] if qlora and recipe.lora.use_peft else [])
    for text, change in singles:
        trial = copy.deepcopy(recipe)
        change(trial)
        if fits(trial):
            return text
    chain = [o for o in (gc, bf16, pre, lora, qlora, batches[-1] if batches else None) if o]
    trial, texts = copy.deepcopy(recipe), []
    for text, change in chain:
        change(trial)
        texts.append(text)
        if text.startswith("lora.use_peft") and trial.reference.mode == "precomputed":
            trial.reference.mode = "auto"  # LoRA's adapter-off reference holds no copy anyway
            texts.remove("reference.mode=precomputed")
        if len(texts) > 1 and fits(trial):
            return " ".join(texts)
    return None


# ------------------------------------------------------------------------------------------ report

def gib(x: float) -> str:
    return f"{x / GiB:6.2f} GiB"


def human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def generated_pairs_lines(recipe: Recipe, per_device: int, steps: int) -> list[str]:
    """What online and iterative DPO add to the plan: their pairs are generated during the run, so the data
    and token figures below (the recipe's fixed pairs) size their training steps, not their generation."""
    t = recipe.train
    scorer = t.online_verifier or t.online_reward_model
    if t.iterative_rounds:
        prompts = t.iterative_prompts or "all the"
        return [f"rounds         {t.iterative_rounds} iterative rounds: each samples {t.online_generations} answers "
                f"to {prompts} training prompts (scored by {scorer}), then trains {steps} steps on the pairs they "
                f"give; the data and tokens below are the recipe's fixed pairs, not the generated ones"]
    if t.online_generations:
        return [f"online         each micro-step samples {t.online_generations} answers to each of {per_device} "
                f"prompts per process (scored by {scorer}) and trains on at most {per_device} pairs; the data "
                "and tokens below are the recipe's fixed pairs, not the generated ones"]
    return []


@dataclass
class Inspection:
    """What the report is built from: the resolved plan and recipe, the model's config and facts, and the
    training data tokenised and counted as the run would."""
    recipe: Recipe
    args: argparse.Namespace
    plan: object  # config.plan.Plan
    note: Optional[str]  # why the plan was made as on a GPU, if it was
    config: object
    facts: ModelFacts
    tokenized: object
    stats: dict
    batches: Batches
    layout: str  # the layout the run uses ("chosen rows" without pairs)
    lay: str  # the layout its tokens are counted in
    steps_per_epoch: int
    steps: int
    dtype_asked: str = "float32"  # the recipe's model.dtype before preflight settled auto for the CPU here
    vision: object = None  # a VLM's `inspect_vision.VisionData` (then `config` is its language model's)

    @property
    def processes(self) -> int:
        return self.args.processes

    @property
    def images(self) -> Optional[tuple]:
        """A VLM's (image tokens, tower inputs) per training pair, for `batch_tokens`."""
        return self.vision.train_counts if self.vision is not None else None


def tokenize_recipe_data(recipe: Recipe, args) -> tuple:
    """(tokenized, stats): the recipe's data tokenised by its tokenizer as the run would (cached, so the
    run reuses it); with --model-config the recipe's tokenizer still counts the tokens."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.tokenize import tokenize_splits
    from dpo_accel.model.loading import load_tokenizer, resolve_model_path

    if args.model_config and not recipe.model.tokenizer_name_or_path:
        recipe.model.tokenizer_name_or_path = recipe.model.model_name_or_path  # the recipe's tokenizer counts tokens
    tok_source = recipe.model.tokenizer_name_or_path or recipe.model.model_name_or_path
    tokenizer = load_tokenizer(recipe.model, resolve_model_path(tok_source, recipe.model.gguf_file))
    splits = load_preference_splits(recipe.data, recipe.train.seed)
    return tokenize_splits(splits, tokenizer, recipe.data)


def run_layout(plan, recipe: Recipe, config, vision=None) -> str:
    """The layout the run feeds the decoder: chosen rows (no pairs), packed, prefix sharing or stacked rows (a
    VLM: what `model.vision.vision_layout` gives its family)."""
    from dpo_accel.model.logps import resolve_prefix_sharing
    from dpo_accel.model.vision import vision_layout

    if not plan.pairs:
        return "chosen rows"
    if vision is not None:
        shared = recipe.train.prefix_sharing is not False and vision_layout(vision.config)[0] == "shared"
        return "shared" if shared else "concat"
    if recipe.train.padding_free:
        return "packed"
    try:
        return "shared" if resolve_prefix_sharing(config, recipe.train.prefix_sharing) else "concat"
    except ValueError as e:
        raise RecipeError(str(e)) from None


def gather_inspection(recipe: Recipe, args) -> Inspection:
    """Plan the recipe, read the model's config and tokenise and count the data (no weights); a VLM's through
    `inspect_vision` (its processor, image counts, the whole model's parameters)."""
    from dpo_accel.inspect_vision import gather_vision, is_vision_config

    asked = recipe.model.dtype
    plan, note = resolve_plan(recipe)
    recipe = plan.recipe
    config = with_attention(model_config(recipe, args.model_config), recipe)
    vision = None
    if is_vision_config(config):
        vision = gather_vision(recipe, args.model_config, config)
        tokenized, stats, config = vision.tokenized, vision.stats, config.get_text_config()
    else:
        tokenized, stats = tokenize_recipe_data(recipe, args)
    processes = args.processes
    batches = batch_tokens(tokenized, recipe, processes, vision.train_counts if vision is not None else None)
    facts = facts_for(config, vision, recipe)
    layout = run_layout(plan, recipe, config, vision)
    lay = layout if layout in batches.per_layout else "concat"
    steps_per_epoch = math.ceil(math.ceil(batches.count / processes) / plan.geometry.accumulation)
    steps = recipe.train.max_steps if recipe.train.max_steps > 0 else math.ceil(
        recipe.train.num_train_epochs * steps_per_epoch)
    return Inspection(recipe, args, plan, note, config, facts, tokenized, stats, batches, layout, lay,
                      steps_per_epoch, steps, asked, vision)


def facts_for(config, vision, recipe: Recipe) -> ModelFacts:
    """The model's facts under `recipe`: a causal LM's (`model_facts`), or a VLM's from its whole meta model
    (`inspect_vision.vision_params`: tower and projector counted) with its language model's shape."""
    if vision is None:
        return model_facts(config, recipe)
    from dpo_accel.inspect_vision import vision_params

    p = vision_params(vision.config, recipe)
    text = vision.config.get_text_config()
    return ModelFacts(p.params, p.trainable, p.matmul, text.num_hidden_layers, text.hidden_size, text.vocab_size,
                      vision.config.model_type)


def plan_lines(ins: Inspection) -> list[str]:
    """The `== plan` section: model, objective, reference, layout, precision, batch geometry and steps."""
    recipe, args, facts, o, g = ins.recipe, ins.args, ins.facts, ins.plan.objective, ins.plan.geometry
    lines = [f"== plan ({recipe.model.model_name_or_path if not args.model_config else args.model_config}, "
             f"{facts.model_type}, {facts.params / 1e6:,.1f}M parameters, {facts.trainable / 1e6:,.2f}M trainable)"]
    terms = " + ".join(f"{w:g} x {spec.name}" if w != 1 else spec.name for spec, w in o.terms)
    lines.append(f"objective      {terms}{f' + {o.config.rpo_alpha:g} x NLL (rpo_alpha)' if o.config.rpo_alpha else ''}"
                 f" | reference: {ins.plan.reference_mode}")
    lines.append(f"layout         {ins.layout} | {recipe.train.mixed_precision or 'launch config'} precision, "
                 f"weights {recipe.model.dtype}{', 4-bit (QLoRA)' if recipe.model.load_in_4bit else ''}"
                 f"{', gradient checkpointing' if recipe.model.gradient_checkpointing else ''}")
    lines.append(f"batch          {g.per_device} pairs x {g.accumulation} accumulation x {ins.processes} process(es) = "
                 f"{g.per_device * g.accumulation * ins.processes} pairs per step")
    lines.append(f"steps          {ins.steps} ({ins.steps_per_epoch} per epoch of {len(ins.tokenized['train'])} pairs)")
    if ins.vision is not None:
        from dpo_accel.inspect_vision import plan_line

        lines.append(plan_line(ins.vision, recipe))
    lines += generated_pairs_lines(recipe, g.per_device, ins.steps)
    if ins.note:
        lines.append(f"note           {ins.note}")
    return lines


def data_lines(ins: Inspection) -> list[str]:
    """The `== data` section: the per-split, per-source summary and the tokens per epoch per layout."""
    from dpo_accel.data.tokenize import format_stats
    from dpo_accel.inspect_vision import image_lines

    batches = ins.batches
    lines = ["", "== data", format_stats(ins.stats), ""]
    if ins.vision is not None:
        lines += image_lines(ins.vision) + [""]
    real = batches.real
    lines.append(f"tokens per epoch (train, {batches.count} micro-batches of {ins.plan.geometry.per_device} "
                 f"in the sampler's order):")
    lines.append(f"  real (chosen + rejected, prompt twice) {real:>12,}")
    if ins.vision is not None:
        lines.append(f"  {'image tokens among them (once a pair)':<38} {batches.image_tokens:>12,}  "
                     f"(and {batches.tower_inputs:,} vision-tower inputs)")
    for key, text in (("concat", "stacked [2B, T] rows"), ("shared", "prefix sharing, one row per pair"),
                      ("packed", "padding-free packing")):
        tokens = batches.per_layout[key]
        lines.append(f"  {text:<38} {tokens:>12,}  ({tokens / max(real, 1):.2f} x real)")
    saving = 1 - batches.per_layout["shared"] / max(batches.per_layout["concat"], 1)
    lines.append(f"  prefix sharing runs {saving:.0%} fewer tokens than stacked rows on this data")
    return lines


def memory_lines(ins: Inspection, device: Device, est: Estimate) -> list[str]:
    """One device's memory table: each term of the estimate, the total, and the other checkpointing choice."""
    recipe, facts = device_recipe(ins, device), ins.facts
    lora = "LoRA " if recipe.lora.use_peft else ""
    lines = [f"-- {device.name}{f' ({device.chip})' if device.chip else ''}"]
    rows = [(f"weights ({recipe.model.dtype}{', 4-bit' if recipe.model.load_in_4bit else ''})", est.weights),
            (f"{lora}gradients + optimizer", est.gradients + est.optimizer),
            (f"reference ({ins.plan.reference_mode})", est.reference)]
    used, other = (est.activations_checkpointed, est.activations) if est.checkpointing else \
        (est.activations, est.activations_checkpointed)
    rows.append((f"activations ({'with' if est.checkpointing else 'no'} checkpointing)", used))
    if ins.vision is not None:
        rows.append(("vision tower forward (frozen)", est.tower))
        if recipe.lora.train_projector:
            rows.append(("projector (saved for backward)", est.projector))
    rows.append((f"LM-head chunk ({lm_head_positions(recipe, facts.vocab)} x {facts.vocab})", est.lm_head))
    rows.append(("CUDA context + allocator" if device.gpu else "CPU allocator (freed blocks kept)", est.overhead))
    rows.append(("total", est.total))
    lines += [f"  {label:<36}{gib(value)}" for label, value in rows]
    lines.append(f"  {'(activations ' + ('without' if est.checkpointing else 'with') + ' checkpointing)':<36}"
                 f"{gib(other)}")
    return lines


def fits_on(ins: Inspection, device: Device):
    """``fits(trial) -> bool``: whether a changed copy of the recipe fits `device` (the test fix_for runs)."""
    from dpo_accel.model.reference import resolve_mode

    def fits(trial: Recipe) -> bool:
        mode = resolve_mode(trial, ins.plan.objective.needs_reference)
        return estimate(trial, facts_for(ins.config, ins.vision, trial), ins.config, mode, ins.lay,
                        batch_tokens(ins.tokenized, trial, ins.processes, ins.images), device, ins.args.backend,
                        ins.processes, ins.vision).total <= device.memory

    return fits


def longest_pair(ins: Inspection, device: Device, recipe: Recipe) -> Optional[int]:
    """Tokens of the longest single pair (prompt once + both answers, as the decoder runs it in the shared
    layout; both rows in stacked ones) whose estimate fits `device` at one pair per micro-batch, to within
    1%: the width doubles until it does not fit, then halves the gap (the 4D mask of a padded row grows with
    the square of the width, the rest linearly). None if not even 512 tokens fit."""
    import dataclasses

    rows = 2 if ins.lay == "concat" else 1

    def fits(width: int) -> bool:
        one = dataclasses.replace(ins.batches, longest={**ins.batches.longest, ins.lay: (rows, width)})
        return estimate(recipe, ins.facts, ins.config, ins.plan.reference_mode, ins.lay, one, device,
                        ins.args.backend, ins.processes, ins.vision).total <= device.memory

    low = 512
    if not fits(low):
        return None
    high = low * 2
    while fits(high) and high < 2 ** 24:
        low, high = high, high * 2
    while high - low > max(low // 100, 1):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * rows


def limit_lines(ins: Inspection, device: Device, recipe: Recipe) -> list[str]:
    """A VLM: the estimate with every pair of a full micro-batch at the recipe's limits (both answers filling
    data.max_length after the shortest prompt seen, each pair with the most tower inputs seen), whatever answers
    the data holds: what its longest answers can reach."""
    import dataclasses

    import numpy as np

    if ins.vision is None or ins.lay not in ("shared", "concat"):
        return []
    b, length = recipe.train.per_device_train_batch_size, recipe.data.max_length
    prompt = int(np.asarray(ins.tokenized["train"]["prompt_length"]).min())
    rows, width = (b, 2 * length - prompt) if ins.lay == "shared" else (2 * b, length)
    inputs = b * int(ins.vision.train_counts[1].max())
    full = dataclasses.replace(ins.batches, longest={**ins.batches.longest, ins.lay: (rows, width)},
                               tower_longest=inputs)
    est = estimate(recipe, ins.facts, ins.config, ins.plan.reference_mode, ins.lay, full, device, ins.args.backend,
                   ins.processes, ins.vision)
    return [f"  every pair at data.max_length ({rows} rows x {width} tokens, {inputs} tower inputs): "
            f"{gib(est.total).strip()}, fits: {'yes' if est.total <= device.memory else 'NO'}"]


def time_and_fit_lines(ins: Inspection, device: Device, est: Estimate, flops: float) -> list[str]:
    """A GPU's time per step and per run at --mfu, whether it fits and, if not, the setting that makes it."""
    args, steps, recipe = ins.args, ins.steps, device_recipe(ins, device)
    per_step = flops / (device.peak_flops * args.mfu)
    lines = [f"  time at {args.mfu:.0%} MFU: {human(per_step)} per step, {human(per_step * steps)} "
             f"for {steps} steps"]
    longest = longest_pair(ins, device, recipe)
    lines.append("  longest pair at 1 pair per micro-batch: "
                 + (f"{longest:,} tokens (the prompt once and both answers)" if longest else "under 512 tokens"))
    lines += limit_lines(ins, device, recipe)
    if est.total <= device.memory:
        lines.append(f"  fits: yes ({gib(device.memory - est.total).strip()} to spare)")
        return lines
    fix = fix_for(recipe, fits_on(ins, device))
    lines.append(f"  fits: NO, {gib(est.total - device.memory).strip()} over; "
                 + (f"set {fix}" if fix else f"no single setting makes it fit: lower data.max_length "
                    f"(now {recipe.data.max_length}), add processes (--backend fsdp2 / zero3) or "
                    f"take a larger GPU"))
    return lines


def device_recipe(ins: Inspection, device: Device) -> Recipe:
    """The recipe as it runs on `device`: ``model.dtype: auto`` settled for a GPU (bf16 units assumed, as on
    every GPU class the estimate knows) rather than for the CPU here."""
    if ins.dtype_asked != "auto" or not device.gpu:
        return ins.recipe
    from dpo_accel.model.speed import adapter_only, auto_dtype

    recipe = copy.deepcopy(ins.recipe)
    recipe.model.dtype = auto_dtype(adapter_only(recipe), f"{device.chip} GPU")[0]
    return recipe


def estimate_lines(ins: Inspection, estimates: dict) -> list[str]:
    """The `== estimate` section, per device (the CPU here, or each --gpu); fills `estimates` by device name."""
    args, batches, lay, processes = ins.args, ins.batches, ins.lay, ins.processes
    devices = [parse_gpu(x) for x in args.gpu] or [Device("cpu (this machine)", None, None)]
    flops = flops_per_step(ins.recipe, ins.facts, ins.plan.reference_mode, batches, lay, ins.config, processes,
                           ins.vision)
    lines = ["", f"== estimate per device (longest micro-batch: {batches.longest[lay][0]} rows x "
                 f"{batches.longest[lay][1]} tokens, {ins.layout}; backend {args.backend}, {processes} process(es))"]
    lines.append(f"FLOPs per optimizer step per device: {flops / 1e12:,.2f} TFLOP")
    for device in devices:
        est = estimate(device_recipe(ins, device), ins.facts, ins.config, ins.plan.reference_mode, lay, batches,
                       device, args.backend, processes, ins.vision)
        estimates[device.name] = est
        lines += memory_lines(ins, device, est)
        if device.gpu:
            lines += time_and_fit_lines(ins, device, est, flops)
    return lines


def report(recipe: Recipe, args) -> tuple[str, dict]:
    """The printed report and its numbers (for tests)."""
    start = time.perf_counter()
    ins = gather_inspection(recipe, args)
    numbers = {"plan": ins.plan, "layout": ins.layout, "steps": ins.steps, "batches": ins.batches,
               "facts": ins.facts, "estimates": {}, "vision": ins.vision}
    lines = plan_lines(ins) + data_lines(ins) + estimate_lines(ins, numbers["estimates"])
    lines.append(f"\n[dpo_accel] inspect took {time.perf_counter() - start:.1f} s (no weights loaded)")
    return "\n".join(lines), numbers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="YAML recipe (sectioned or flat handbook/TRL style)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.add_argument("--gpu", action="append", default=[], metavar="24GB[:TFLOPS]",
                   help="estimate for a GPU of this memory (repeatable); none: the CPU here")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for times (0.4)")
    p.add_argument("--model-config", help="a config.json (or folder) to estimate instead of the recipe's model; "
                                          "the recipe's tokenizer still counts the tokens")
    p.add_argument("--backend", default="single", choices=("single", "ddp", "fsdp2", "zero2", "zero3"))
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes (ddp, fsdp2, zero)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import datasets

    datasets.disable_progress_bars()
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
        text, _ = report(recipe, args)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
