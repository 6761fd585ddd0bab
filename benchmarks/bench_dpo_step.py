"""One DPO optimizer step, configurations side by side: time, tokens/s, peak memory and MFU.

    python -m benchmarks.bench_dpo_step                  # SmolLM2-135M-Instruct, LoRA r=16 all-linear, 4 pairs, max_length 512
    python -m benchmarks.bench_dpo_step --steps 5 --configs naive,default,fastest_bf16,packed,trl
    python -m benchmarks.bench_dpo_step --quick          # tiny random model, seconds (the CI smoke test)
    python -m benchmarks.bench_dpo_step --repeats 3 --sweep 512,2048,4096   # medians of 3 rounds + the length sweep
    PYTHONPATH=/path/to/trl python -m benchmarks.bench_dpo_step   # adds the TRL DPOTrainer rows

Every configuration runs in its own subprocess (``--no-subprocess`` to share one), so each peak memory
is its own: peak RSS on CPU, peak allocated on CUDA. The rows (``--configs``; default all but the
optional ones):

    naive             two separate forwards (chosen, rejected) through the full [B, T, V] logits, float32
                      log_softmax, random batches; the reference the same with the LoRA adapter switched off
    default           dpo_accel's recipe defaults: model.dtype auto (a bf16 frozen base under the float32 LoRA
                      adapter where the device has bf16 matrix units, else float32), one forward per batch
                      with prefix sharing (each pair's prompt run once: a segment [prompt | chosen answer |
                      rejected answer] whose rejected answer does not see the chosen one), each batch either
                      packed into one row with attention run per pair or as one padded row per pair,
                      whichever a cost fitted at start-up calls cheaper, LM head on label positions only in
                      chunks sized by the vocabulary (64 MiB, at most 256 positions), length-grouped batches
    default_fp32      default with float32 weights (model.dtype float32: the default before auto)
    fastest_bf16      + bf16 weights (model.dtype bfloat16; LoRA stays float32) and bf16 autocast
    leanest           + gradient checkpointing (non-reentrant), 128-position chunks, bf16 weights + autocast
    default_pre, fastest_bf16_pre
                      default / fastest_bf16 with reference.mode precomputed: the reference log-probs come
                      from a pre-pass (timed and reported apart: it runs once per dataset and model and is
                      cached on disk across runs and epochs), so the step runs the policy only (4 N per token)
    unshared, unshared_bf16
                      default / fastest_bf16 with prefix_sharing off: chosen and rejected rows stacked
                      [2B, T], the original DPO trainer's layout (what prefix sharing gains, same run)
    padded_shared     default with one padded row per pair and a [B, 1, L, L] mask (train.pack_pairs: false),
                      the layout before packed pairs
    trl               TRL DPOTrainer with DPOConfig's defaults (gradient checkpointing on, bf16 on) on the same
                      model, LoRA, pairs and batches (only when `trl` is importable; skipped otherwise)
    optional          default_bf16 (autocast over float32 weights), chunk1024 (the LM head in 1024-position
                      chunks), packed, packed_bf16 (train.padding_free: on CPU the packed row's dense
                      block-diagonal attention costs more than length grouping's little padding), leanest_fp32,
                      compile, compile_bf16 (torch.compile/inductor of the decoder; the warm-up step
                      compiles, minutes on 2 cores),
                      ckpt_fp32 (default + gradient checkpointing), trl_fp32 (bf16=False),
                      trl_no_gc (gradient_checkpointing=False)

Repeats (``--repeats N``): every row runs once per round, TRL last (A B .. T A B .. T), N rounds; each row
reports the median of its rounds and the spread (max - min) / median, and its ratios to TRL come with the
range of the per-round ratios. Length sweep (``--sweep 512,2048,4096``): prompt-heavy pairs (about 65%
prompt, lengths within a few percent of the target) of about that many real tokens per pair (chosen +
rejected rows), ``--sweep-batch`` pairs per step, rows ``--sweep-configs``; it prints the scaling table and,
per row, how step time and peak memory grow with length and the memory per extra 1k tokens between
successive lengths (equal numbers: linear in tokens).

Data: deterministic preference pairs of real English prose, the Python reference manual shipped with
CPython (pydoc_data.topics): a passage as the prompt, its true continuation as chosen, another passage
as rejected, lengths drawn so a pair holds about 315 tokens and random batches of 4 pairs pad to about
twice their real tokens. Each configuration times the same number of optimizer steps (after --warmup
untimed ones) on batches at evenly spaced positions of its own sampler's epoch (random or
length-grouped), so every sampler is sampled fairly; TRL gets the naive row's batches, in order.

Columns: median step time; real tokens/s (non-padding tokens of chosen and rejected rows over the timed
steps' total time: the pairs' tokens, as TRL counts them, so rows compare pairs per second); processed
tokens/s (the tokens the decoder actually ran on, padding included, a shared prefix once); peak memory;
MFU = F x unique tokens/s / roof, unique = the real tokens the decoder ran (= real, except that prefix
sharing runs a pair's common prefix once), with F = 6 N per token for LoRA (policy forward,
activation gradients, reference forward; no weight gradients for the frozen base) or 8 N for full
fine-tuning (+ weight gradients), 2 N less where the reference is precomputed, N the base model's
parameters, and the roof the best 2048^3 matmul rate of the row's dtype measured here (before and
after the rows). The lean path skips the LM head on prompt positions, which F still counts, so
its MFU can read above the hardware's. A check runs the naive, default and leanest
log-prob paths on one batch in float32 and reports their differences (target: 1e-5).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

IGNORE_INDEX = -100

# name -> what it is. "kind": ours | naive | trl; the rest are recipe switches of our loop.
CONFIGS = {
    "naive": dict(kind="naive", label="naive: 2 forwards, full logits, random batches"),
    "default": dict(kind="ours", label="dpo_accel default (model.dtype auto, prefix sharing, layout per batch, lean "
                                       "log-probs)", dtype="auto"),
    "default_fp32": dict(kind="ours", label="dpo_accel default with float32 weights (model.dtype float32)"),
    "fastest_bf16": dict(kind="ours", label="dpo_accel fastest bf16 (default + bf16 weights + autocast)",
                         bf16=True, bf16_weights=True),
    "leanest": dict(kind="ours", label="dpo_accel leanest (grad ckpt, chunk 128, bf16 weights + autocast)",
                    gradient_checkpointing=True, chunk_size=128, bf16=True, bf16_weights=True),
    "default_pre": dict(kind="ours", label="default, reference precomputed", precomputed=True, dtype="auto"),
    "fastest_bf16_pre": dict(kind="ours", label="fastest bf16, reference precomputed", bf16=True,
                             bf16_weights=True, precomputed=True),
    "unshared": dict(kind="ours", label="default without prefix sharing (stacked [2B, T] rows)", prefix_sharing=False),
    "padded_shared": dict(kind="ours", label="default with a padded row per pair (4D mask) instead of packed pairs",
                          pack_pairs=False),
    "unshared_bf16": dict(kind="ours", label="fastest bf16 without prefix sharing", bf16=True, bf16_weights=True,
                          prefix_sharing=False),
    "trl": dict(kind="trl", label="TRL 1.16 DPOTrainer defaults (grad ckpt, bf16)"),
    # optional rows
    "default_bf16": dict(kind="ours", label="dpo_accel default + bf16 autocast (float32 weights)", bf16=True),
    "chunk1024": dict(kind="ours", label="dpo_accel default with 1024-position LM-head chunks", chunk_size=1024),
    "packed": dict(kind="ours", label="dpo_accel default + packing", packing=True),
    "packed_bf16": dict(kind="ours", label="dpo_accel default + packing + bf16 autocast", packing=True, bf16=True),
    "leanest_fp32": dict(kind="ours", label="dpo_accel grad ckpt + chunk 128, float32", gradient_checkpointing=True,
                         chunk_size=128),
    "ckpt_fp32": dict(kind="ours", label="dpo_accel default + gradient checkpointing (float32)",
                      gradient_checkpointing=True),
    "compile": dict(kind="ours", label="dpo_accel default + torch.compile (inductor)", compile=True),
    "compile_bf16": dict(kind="ours", label="dpo_accel fastest bf16 + torch.compile (inductor)", compile=True,
                         bf16=True, bf16_weights=True),
    "trl_fp32": dict(kind="trl", label="TRL DPOTrainer, bf16=False", bf16=False),
    "trl_no_gc": dict(kind="trl", label="TRL DPOTrainer, gradient_checkpointing=False", gradient_checkpointing=False),
}
DEFAULT_CONFIGS = ("naive", "default", "fastest_bf16", "leanest", "default_pre", "fastest_bf16_pre", "unshared",
                   "unshared_bf16", "trl")
OPTIONAL_CONFIGS = tuple(n for n in CONFIGS if n not in DEFAULT_CONFIGS)


@dataclasses.dataclass
class Setup:
    """Everything a worker needs to rebuild the same model, data and batches."""
    model_path: str
    conversational: bool = True  # prompts/answers as chat messages (the model's chat template), else raw text
    pairs: int = 200  # pairs in the dataset the samplers draw from
    batch_size: int = 4  # pairs per optimizer step
    max_length: int = 512
    max_prompt_length: int = 256
    steps: int = 3  # timed optimizer steps
    warmup: int = 1  # untimed steps first
    lora_r: int = 16  # 0: full fine-tuning
    seed: int = 0
    prompt_words: tuple = (3.45, 0.95, 5, 100)  # lognormal mu, sigma, min, max words of the prompt passage
    answer_words: tuple = (3.2, 0.9, 8, 230)  # same for each answer
    quick: bool = False
    profile: bool = False  # torch.profiler over the timed steps (our rows): self CPU time by kind of op


# ---------------------------------------------------------------------------------------------- data

def english_paragraphs() -> list[str]:
    """Prose paragraphs of the Python reference manual that ships with CPython (no download): indented
    blocks (code, grammar) are left out."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 12 and any(c.islower() for c in text):
                paragraphs.append(text)
    return paragraphs


def _lognormal_words(rng: random.Random, spec: tuple) -> int:
    mu, sigma, lo, hi = spec
    return int(min(hi, max(lo, int(rng.lognormvariate(mu, sigma)))))


def build_pairs(setup: Setup, tokenizer) -> list[dict]:
    """``setup.pairs`` preference pairs, the same for every run: prompt = an instruction and a passage,
    chosen = the passage's true continuation, rejected = a passage from elsewhere. An answer is cut
    (by words) until prompt + answer fits ``max_length`` - 8 tokens, and a prompt until it fits
    ``max_prompt_length``, so no configuration truncates."""
    words = " ".join(english_paragraphs()).split()
    rng = random.Random(setup.seed)
    budget = setup.max_length - 8

    def render(prompt: str, answer: Optional[str] = None) -> int:
        if setup.conversational:
            messages = [{"role": "user", "content": prompt}]
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
        else:
            text = prompt + (answer or "")
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    pairs = []
    for _ in range(setup.pairs):
        n_prompt = _lognormal_words(rng, setup.prompt_words)
        start = rng.randrange(len(words) - 2000)
        while True:
            prompt = INSTRUCTION + " ".join(words[start:start + n_prompt])
            if n_prompt <= 1 or render(prompt) <= setup.max_prompt_length:
                break
            n_prompt = int(n_prompt * 0.9)
        answers = []
        for offset in (start + n_prompt, rng.randrange(len(words) - 2000)):
            n = _lognormal_words(rng, setup.answer_words)
            while n > 1 and render(prompt, " ".join(words[offset:offset + n])) > budget:
                n = int(n * 0.9)
            answers.append(" ".join(words[offset:offset + n]))
        if setup.conversational:
            pairs.append({"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": answers[0]}],
                          "rejected": [{"role": "assistant", "content": answers[1]}]})
        else:
            pairs.append({"prompt": prompt, "chosen": " " + answers[0], "rejected": " " + answers[1]})
    return pairs


def load_tokenizer(setup: Setup):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenized_dataset(setup: Setup, tokenizer, pairs: list[dict]):
    """The pairs through dpo_accel.data.formats (chat template, labels, EOS), as training sees them."""
    import datasets

    from dpo_accel.data.formats import normalise_split
    from dpo_accel.data.tokenize import tokenize_splits
    from dpo_accel.config.schema import DataConfig

    fmt = "conversational" if setup.conversational else "explicit"
    cfg = DataConfig(max_length=setup.max_length, max_prompt_length=setup.max_prompt_length)
    splits = datasets.DatasetDict({"train": normalise_split(datasets.Dataset.from_list(pairs), fmt, "train")})
    tokenized, stats = tokenize_splits(splits, tokenizer, cfg)
    if stats["train"]["truncated"] or stats["train"]["dropped"]:
        raise RuntimeError(f"benchmark pairs were truncated or dropped: {stats['train']}")
    return tokenized["train"]


def selected_batches(setup: Setup, dataset, grouped: bool, how: str, pad_token_id: int) -> list[list[int]]:
    """Row indices of the warm-up + timed batches from one epoch of the sampler (random or length-grouped).

    The first warm-up batch is the epoch's largest for the row's forward (`how`, see `token_counts`), so
    each configuration's peak memory is the one a whole epoch would reach; the timed batches sit at
    evenly spaced positions of the epoch, so their tokens/s is the epoch's (grouped batches run from
    long to short)."""
    from torch.utils.data import RandomSampler

    from dpo_accel.data.collate import LengthGroupedSampler, sequence_lengths

    if grouped:
        by = "shared" if how == "packed_shared" else how  # a pair's c + r - s either way
        sampler = LengthGroupedSampler(sequence_lengths(dataset, by), setup.batch_size, seed=setup.seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(setup.seed))
    order = list(sampler)
    batches = [order[i:i + setup.batch_size] for i in range(0, len(order) - setup.batch_size + 1, setup.batch_size)]
    if setup.warmup + setup.steps > len(batches):
        raise SystemExit(f"--pairs {setup.pairs} gives {len(batches)} batches; need {setup.warmup + setup.steps}")
    largest = max(batches, key=lambda rows: token_counts(collate(dataset, rows, pad_token_id), how)[2])
    timed = [batches[int((i + 0.5) * len(batches) / setup.steps)] for i in range(setup.steps)]
    extra = [batches[int((i + 0.5) * len(batches) / setup.warmup)] for i in range(1, setup.warmup)]
    return ([largest] if setup.warmup else []) + extra + timed


def collate(dataset, rows: list[int], pad_token_id: int) -> dict:
    from dpo_accel.data.collate import PreferenceCollator

    return PreferenceCollator(pad_token_id)([dataset[int(i)] for i in rows])


def token_counts(batch: dict, how: str) -> tuple[int, int, int]:
    """(real, unique, processed) tokens of a collated batch. real: the non-padding tokens of the chosen and
    rejected rows; unique: those the decoder runs, a prefix shared by a pair's two rows counted once
    (prefix sharing) or twice (every other layout); processed: what the decoder runs on, padding
    included, under `how`: 'separate' (two forwards, each side padded to its own longest row), or a
    layout of dpo_accel (logps.processed_tokens: 'concat' one [2B, T] forward, 'shared', 'packed')."""
    from dpo_accel.model.logps import processed_tokens, shared_prefix_lengths

    cm, rm = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
    real = int(cm.sum() + rm.sum())
    if how == "separate":
        return real, real, cm.numel() + rm.numel()
    unique = real - int(shared_prefix_lengths(batch).sum()) if how in ("shared", "packed_shared") else real
    return real, unique, processed_tokens(batch, how)


# -------------------------------------------------------------------------------------------- models

def tiny_model_dir(folder: str) -> str:
    """--quick: a 2-layer random Llama and a byte-level tokenizer (259 ids), saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the base model (LoRA's own A/B matrices left out)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def recipe_for(setup: Setup, cfg: dict):
    from dpo_accel.config.load import recipe_from_dict
    from dpo_accel.model.speed import on_gpu, resolve_model_dtype

    r = max(setup.lora_r, 1)
    recipe = recipe_from_dict({
        "model": {"model_name_or_path": setup.model_path,
                  "dtype": cfg.get("dtype") or ("bfloat16" if cfg.get("bf16_weights") else "float32"),
                  "gradient_checkpointing": bool(cfg.get("gradient_checkpointing", False))},
        "lora": {"use_peft": setup.lora_r > 0, "lora_r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0},
        "data": {"max_length": setup.max_length, "max_prompt_length": setup.max_prompt_length},
        "train": {"per_device_train_batch_size": setup.batch_size, "learning_rate": 5e-6,
                  "logps_chunk_size": int(cfg.get("chunk_size", 256)), "padding_free": bool(cfg.get("packing")),
                  "prefix_sharing": cfg.get("prefix_sharing"),  # None: the recipe default (auto)
                  "pack_pairs": cfg.get("pack_pairs"),
                  "mixed_precision": "bf16" if cfg.get("bf16") else "no", "torch_compile": bool(cfg.get("compile"))},
    })
    resolve_model_dtype(recipe, on_gpu())  # model.dtype auto, as preflight settles it
    return recipe


def naive_logps(model: torch.nn.Module, batch: dict) -> dict:
    """The baseline: each side through the model on its own, full [B, T, V] logits, float32 log_softmax
    over all of them, then the label tokens gathered and summed. Same keys as dpo_accel.model.logps."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out[f"{side}_logps"] = (token * keep).sum(-1)
        out[f"{side}_tokens"] = keep.sum(-1).float()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "peak allocated (CUDA)"
    return peak_rss_bytes(), "peak RSS"


def peak_rss_bytes() -> int:
    """This process's own peak RSS. Linux's ru_maxrss survives exec, so a child started by a large parent
    (pytest, a sweep driver) would report the parent's peak; VmHWM belongs to the current address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------------------- workers

OP_KINDS = (  # (kind, substrings of aten op names), first match wins; self time, so nested ops count once
    ("matmul", ("mm", "matmul", "linear", "baddbmm", "addmv")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("copies and casts", ("copy_", "_to_copy", "clone", "contiguous")),
    ("element-wise", ("mul", "add", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "exp", "log", "cat",
                      "where", "masked", "softmax", "sum", "cos", "sin", "embedding", "index", "gather", "fill",
                      "zero", "max", "sigmoid", "sqrt", "norm")),
)


def op_kind(name: str) -> str:
    op = name.split("::")[-1]
    return next((kind for kind, parts in OP_KINDS if any(p in op for p in parts)), "other")


def profile_shares(prof) -> dict:
    """Each kind of op's share of the profiled self CPU time, plus the top ops (name, share)."""
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares: dict = {}
    for e in events:
        shares[op_kind(e.key)] = shares.get(op_kind(e.key), 0.0) + e.self_cpu_time_total / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"kinds": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "top": [(e.key, e.self_cpu_time_total / total) for e in top]}


def profile_lines(results: dict) -> list[str]:
    """The --profile summary: per profiled row, the share of self CPU time by kind of op and the top ops."""
    lines = []
    for name, r in results.items():
        shares = r.get("profile") if isinstance(r, dict) else None
        if shares:
            kinds = ", ".join(f"{kind} {100 * x:.0f}%" for kind, x in shares["kinds"].items())
            top = ", ".join(f"{op.split('::')[-1]} {100 * x:.0f}%" for op, x in shares["top"])
            lines += [f"profile {name}: {kinds}", f"  top ops: {top}"]
    return lines


def step_profiler(setup: Setup):
    """A torch profiler that records only the timed steps (call ``.step()`` after each), or a no-op."""
    if not setup.profile:
        return contextlib.nullcontext(SimpleNamespace(step=lambda: None))
    from torch.profiler import ProfilerActivity, profile, schedule

    return profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=setup.warmup, warmup=0,
                                                                          active=setup.steps, repeat=1))


def run_ours(setup: Setup, name: str) -> dict:
    """dpo_accel's training step (the loop body of train.py) with the configuration's recipe switches;
    the naive row uses the same loop with `naive_logps` in place of the PreferenceLogpsModel."""
    from accelerate import Accelerator

    from dpo_accel.model.logps import PreferenceLogpsModel
    from dpo_accel.objectives.registry import compute_objective
    from dpo_accel.model.loading import load_policy
    from dpo_accel.model.reference import AdapterOffReference, CopyReference
    from dpo_accel.model.speed import check_speed_options, compile_decoder
    from dpo_accel.loops.engine import build_optimizer

    cfg = CONFIGS[name]
    naive = cfg["kind"] == "naive"
    recipe = recipe_for(setup, cfg)
    check_speed_options(recipe)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.train.mixed_precision)
    device = accelerator.device
    tokenizer = load_tokenizer(setup)
    dataset = tokenized_dataset(setup, tokenizer, build_pairs(setup, tokenizer))
    policy = load_policy(recipe.model, recipe.lora, setup.model_path)
    n_params = base_parameter_count(policy)
    if naive:
        model, how = policy, "separate"
    else:
        model = PreferenceLogpsModel(policy, chunk_size=recipe.train.logps_chunk_size, chunk_mb=recipe.train.logps_chunk_mb,
                                     packing=recipe.train.padding_free, prefix_sharing=recipe.train.prefix_sharing,
                                     pack_pairs=recipe.train.pack_pairs)
        first = collate(dataset, list(range(min(max(2, min(setup.batch_size, 8)), len(dataset)))), tokenizer.pad_token_id)
        model.settle(first)  # the start-up self-check and layout timing (train.py's), before batching
        how = model.layout
        if recipe.train.torch_compile:
            compile_decoder(model)
    batches = [collate(dataset, rows, tokenizer.pad_token_id)
               for rows in selected_batches(setup, dataset, not naive, how, tokenizer.pad_token_id)]
    optimizer, _ = build_optimizer(recipe, model, len(batches))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if recipe.lora.use_peft:
        unwrapped = accelerator.unwrap_model(model)
        if naive:
            @torch.no_grad()
            def reference(batch):
                with unwrapped.disable_adapter():
                    return {k: v.detach() for k, v in naive_logps(unwrapped, batch).items()}
        else:
            reference = AdapterOffReference(unwrapped).logps
    else:  # full fine-tuning: a frozen copy of the starting weights
        from dpo_accel.model.loading import load_frozen_copy

        copy = load_frozen_copy(setup.model_path, recipe.model, None, device)
        module = copy if naive else PreferenceLogpsModel(copy, chunk_size=recipe.train.logps_chunk_size,
                                                         chunk_mb=recipe.train.logps_chunk_mb,
                                                         packing=recipe.train.padding_free,
                                                         prefix_sharing=recipe.train.prefix_sharing,
                                                         pack_pairs=recipe.train.pack_pairs)
        reference = (lambda b: {k: v.detach() for k, v in naive_logps(module, b).items()}) if naive else \
            CopyReference(module, accelerator.autocast).logps
    prepass = []
    if cfg.get("precomputed"):  # reference.mode precomputed: a no-grad pass first, then a lookup by row index
        from dpo_accel.model.reference import REF_KEYS, PrecomputedReference

        table = {k: torch.zeros(len(dataset)) for k in REF_KEYS}
        model.eval()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            _sync(device)
            start = time.perf_counter()
            with accelerator.autocast():
                out = reference(batch)
            _sync(device)
            prepass.append(time.perf_counter() - start)
            for k in REF_KEYS:
                table[k][batch["idx"].cpu()] = out[k].float().cpu()
        model.train()
        reference = PrecomputedReference({"train": table}).logps

    times, cpu, real, unique, processed, losses = [], [], [], [], [], []
    with step_profiler(setup) as prof:
        for batch in batches:
            counts = token_counts(batch, how if naive else accelerator.unwrap_model(model).layout_of(batch))
            batch = {k: v.to(device) for k, v in batch.items()}
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            policy_logps = naive_logps(model, batch) if naive else model(**batch)  # prepare() added autocast
            ref = reference(batch)
            out = compute_objective(recipe.loss, policy_logps, ref)
            accelerator.backward(out.loss)
            accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            real.append(counts[0])
            unique.append(counts[1])
            processed.append(counts[2])
            losses.append(float(out.loss))
            prof.step()
    peak, mem_kind = _peak_memory(device)
    return dict(times=times, cpu=cpu, real=real, unique=unique, processed=processed, losses=losses, peak=peak,
                mem_kind=mem_kind,
                n_params=n_params, lora=recipe.lora.use_peft, prepass=prepass,
                dtype="bfloat16" if cfg.get("bf16") or recipe.model.dtype == "bfloat16" else "float32",
                device=str(device), layout=how, profile=profile_shares(prof) if setup.profile else None)


def run_trl(setup: Setup, name: str) -> dict:
    """TRL's DPOTrainer on the same model, LoRA, pairs and batches (the naive row's, in order)."""
    try:
        import trl
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return {"skipped": "trl is not importable (pip install trl to add this row)"}
    import datasets
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    cfg = CONFIGS[name]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = load_tokenizer(setup)
    pairs = build_pairs(setup, tokenizer)
    dataset = tokenized_dataset(setup, tokenizer, pairs)
    order = [i for rows in selected_batches(setup, dataset, False, "concat", tokenizer.pad_token_id) for i in rows]
    ours = [token_counts(collate(dataset, order[i:i + setup.batch_size], tokenizer.pad_token_id), "concat")
            for i in range(0, len(order), setup.batch_size)]
    train_rows = datasets.Dataset.from_list([pairs[int(dataset[int(i)]["source_idx"])] for i in order])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.cpu_start, self.cpu_ends = None, [], None, []

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                _sync(device)
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    class BenchDPOTrainer(DPOTrainer):
        seen: list = []

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            self.seen.append((int(mask.sum()), int(mask.numel())))
            return super().training_step(model, inputs, *args, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32)
    n_params = base_parameter_count(model)
    peft_config = None
    if setup.lora_r > 0:
        peft_config = LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs = {k: cfg[k] for k in ("bf16", "gradient_checkpointing") if k in cfg}
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=setup.batch_size,
                         max_steps=setup.warmup + setup.steps, max_length=setup.max_length, learning_rate=5e-6,
                         report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True,
                         use_cpu=not cuda, seed=setup.seed, dataloader_num_workers=0, **kwargs)
        trainer = BenchDPOTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[clock])
        trainer.train()
    ends = clock.ends
    times = [ends[0] - clock.start] + [b - a for a, b in zip(ends, ends[1:])]
    cpu_ends = clock.cpu_ends
    cpu = [cpu_ends[0] - clock.cpu_start] + [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    seen = BenchDPOTrainer.seen
    peak, mem_kind = _peak_memory(device)
    return dict(times=times, cpu=cpu, real=[s[0] for s in seen], processed=[s[1] for s in seen],
                ours_real=[c[0] for c in ours], peak=peak, mem_kind=mem_kind, n_params=n_params,
                lora=setup.lora_r > 0, dtype="bfloat16" if args.bf16 else "float32", device=str(device),
                trl_version=trl.__version__, gradient_checkpointing=bool(args.gradient_checkpointing))


def run_check(setup: Setup, name: str = "check") -> dict:
    """float32, one batch (the naive row's first), LoRA adapter perturbed so policy != reference: the
    naive path against dpo_accel's layouts (default = prefix sharing with the pairs packed into one row,
    leanest = the same + gradient checkpointing + 128-position chunks, padded = prefix sharing with a padded
    row per pair, stacked = [2B, T] rows, packed = padding-free): policy and
    reference log-probs, loss and LoRA gradients."""
    from dpo_accel.model.logps import PreferenceLogpsModel
    from dpo_accel.objectives.registry import compute_objective
    from dpo_accel.model.loading import load_policy

    recipe = recipe_for(setup, {})
    tokenizer = load_tokenizer(setup)
    dataset = tokenized_dataset(setup, tokenizer, build_pairs(setup, tokenizer))
    rows = selected_batches(setup, dataset, False, "separate", tokenizer.pad_token_id)[-1]
    batch = collate(dataset, rows, tokenizer.pad_token_id)
    policy = load_policy(recipe.model, recipe.lora, setup.model_path).train()
    if recipe.lora.use_peft:
        generator = torch.Generator().manual_seed(setup.seed)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    base = policy.get_base_model() if recipe.lora.use_peft else policy

    def step(path: str) -> dict:
        if path == "leanest":
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = PreferenceLogpsModel(policy, chunk_size=256 if path in ("default", "stacked", "padded") else 128,
                                      packing=path == "packed", prefix_sharing=path in ("default", "leanest", "padded"),
                                      pack_pairs=path != "padded")
        forward = (lambda b: naive_logps(policy, b)) if path == "naive" else (lambda b: module(**b))
        pol = forward(batch)
        with torch.no_grad(), (policy.disable_adapter() if recipe.lora.use_peft else contextlib.nullcontext()):
            ref = forward(batch)
        out = compute_objective(recipe.loss, pol, ref)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in trainable])
        for _, p in trainable:
            p.grad = None
        if path == "leanest":
            base.gradient_checkpointing_disable()
        return dict(policy=torch.cat([pol["chosen_logps"], pol["rejected_logps"]]).detach(),
                    reference=torch.cat([ref["chosen_logps"], ref["rejected_logps"]]).detach(),
                    loss=out.loss.detach(), grads=grads)

    paths = ("default", "leanest", "padded", "stacked", "packed")
    results = {path: step(path) for path in ("naive",) + paths}
    naive = results["naive"]
    report = {"logps_magnitude": float(naive["policy"].abs().max()), "tokens": int(batch["chosen_attention_mask"].sum()
                                                                                  + batch["rejected_attention_mask"].sum())}
    for path in paths:
        r = results[path]
        report[path] = {
            "policy_logps_abs": float((r["policy"] - naive["policy"]).abs().max()),
            "reference_logps_abs": float((r["reference"] - naive["reference"]).abs().max()),
            "logps_rel": float(max(((r[k] - naive[k]).abs() / naive[k].abs().clamp(min=1)).max()
                                   for k in ("policy", "reference"))),
            "loss_abs": float((r["loss"] - naive["loss"]).abs()),
            "grad_rel": float((r["grads"] - naive["grads"]).norm() / naive["grads"].norm().clamp(min=1e-30)),
        }
    return report


def _quiet() -> None:
    """No progress bars or load reports from datasets / transformers in the benchmark's output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


WORKERS = {"ours": run_ours, "naive": run_ours, "trl": run_trl}


def run_worker(setup: Setup, name: str) -> dict:
    _quiet()
    threads = torch.get_num_threads()
    if setup.quick:  # a tiny model's thousands of small ops: one thread avoids OpenMP barriers that stall
        torch.set_num_threads(1)  # for a whole time slice whenever another process holds a core
    try:
        if name == "check":
            return run_check(setup)
        return WORKERS[CONFIGS[name]["kind"]](setup, name)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- roof

def measure_roof(device: torch.device, size: int = 2048, reps: int = 10) -> dict:
    """Best-of-`reps` FLOP/s of a size^3 matmul in float32 and bfloat16 on `device` (this machine's roof)."""
    roof = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b
        best = math.inf
        for _ in range(reps):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        roof[str(dtype).replace("torch.", "")] = 2 * size ** 3 / best
    return roof


# ----------------------------------------------------------------------------------------- reporting

def summarise(name: str, r: dict, roof: dict, warmup: int) -> dict:
    times, real, processed = r["times"][warmup:], r["real"][warmup:], r["processed"][warmup:]
    unique = r.get("unique", r["real"])[warmup:]  # TRL runs both rows of a pair in full
    total = sum(times)
    real_tps = sum(real) / total
    flops_per_token = ((6 if r["lora"] else 8) - (2 if r.get("prepass") else 0)) * r["n_params"]
    prepass = sum(r["prepass"][warmup:]) if r.get("prepass") else 0.0
    return dict(name=name, label=CONFIGS[name]["label"], step_s=statistics.median(times), real_tps=real_tps,
                processed_tps=sum(processed) / total, pad_ratio=sum(processed) / sum(real), peak_gb=r["peak"] / 2 ** 30,
                mfu=flops_per_token * sum(unique) / total / roof[r["dtype"]], dtype=r["dtype"], mem_kind=r["mem_kind"],
                real_per_step=sum(real) / len(real),
                cpu_s=statistics.median(r["cpu"][warmup:]) if r.get("cpu") else float("nan"),
                precomputed=bool(r.get("prepass")), prepass_s=prepass / len(times),
                one_epoch_tps=sum(real) / (total + prepass))


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
MEDIAN_KEYS = ("step_s", "real_tps", "processed_tps", "pad_ratio", "peak_gb", "mfu", "real_per_step", "cpu_s",
               "prepass_s", "one_epoch_tps")


def spread(values: list) -> float:
    """(max - min) / median: how far the repeats of one number lie apart."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def median_row(reps: list[dict], trl_reps: Optional[list[dict]] = None) -> dict:
    """One row from its repeats (`summarise` of each): the median of every number, the spread of tokens/s and
    peak memory, and the range of the per-round ratios to TRL (each repeat against the TRL run of its round)."""
    row = dict(reps[0])
    for key in MEDIAN_KEYS:
        row[key] = statistics.median(r[key] for r in reps)
    row.update(repeats=len(reps), tps_spread=spread([r["real_tps"] for r in reps]),
               peak_spread=spread([r["peak_gb"] for r in reps]))
    if trl_reps and row["name"] != "trl":
        pairs = list(zip(reps, trl_reps))
        row["tps_vs_trl_range"] = [f(a["real_tps"] / b["real_tps"] for a, b in pairs) for f in (min, max)]
        row["mem_vs_trl_range"] = [f(a["peak_gb"] / b["peak_gb"] for a, b in pairs) for f in (min, max)]
    return row


def _ratio(r: dict, base: Optional[dict], key: str) -> str:
    if not base:
        return "-"
    text = f"{r[key] / base[key]:.2f}x"
    span = r.get({"real_tps": "tps_vs_trl_range", "peak_gb": "mem_vs_trl_range"}.get(key, ""))
    if base["name"] == "trl" and span and r.get("repeats", 1) > 1:
        text += f" ({span[0]:.2f}-{span[1]:.2f})"
    return text


def format_table(rows: list[dict], roof: dict, shared_process: bool) -> str:
    base_trl = next((r for r in rows if r["name"] == "trl"), None)
    base_naive = next((r for r in rows if r["name"] == "naive"), None)
    mem = "peak GB" if not shared_process else "peak GB (shared process: not per row)"
    repeats = max((r.get("repeats", 1) for r in rows), default=1)
    lines = [f"| configuration | step s | CPU s/step | real tok/s (spread) | processed tok/s | processed / real "
             f"| {mem} (spread) | MFU | tok/s vs TRL | mem vs TRL | tok/s vs naive |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['step_s']:.2f} | {r['cpu_s']:.1f} | {r['real_tps']:.0f} "
                     f"({100 * r.get('tps_spread', 0):.0f}%) | {r['processed_tps']:.0f} | {r['pad_ratio']:.2f} "
                     f"| {r['peak_gb']:.2f} ({100 * r.get('peak_spread', 0):.0f}%) | {100 * r['mfu']:.1f}% "
                     f"({SHORT_DTYPE[r['dtype']]}) | {_ratio(r, base_trl, 'real_tps')} | {_ratio(r, base_trl, 'peak_gb')} "
                     f"| {_ratio(r, base_naive, 'real_tps')} |")
    lines.append(f"\nmedians of {repeats} repeat(s), each round running every row once with TRL last (A B .. T A B .. T); "
                 "spread = (max - min) / median over the repeats; ratios to TRL: of the medians, in brackets the range "
                 "of the per-round ratios.")
    lines.append(f"roof (2048^3 matmul, measured here): float32 {roof['float32'] / 1e9:.0f} GFLOP/s, "
                 f"bfloat16 {roof['bfloat16'] / 1e9:.0f} GFLOP/s; MFU uses the roof of the row's dtype. CPU s/step: "
                 "process CPU time of all threads (less sensitive than wall time to other load on the machine).")
    return "\n".join(lines)


def target_lines(rows: list[dict], heading: str = "targets (vs TRL's defaults)") -> list[str]:
    """The release's targets against the TRL row: the default row at least 2.5x TRL's tokens/s within its peak
    memory; the fastest of our rows at least 35% MFU of its dtype's roof; the leanest row that keeps 2.5x TRL's
    speed at most 0.25x its memory. Each line names the row it judges."""
    trl = next((r for r in rows if r["name"] == "trl"), None)
    ours = [r for r in rows if CONFIGS[r["name"]]["kind"] == "ours"]
    out = [f"{heading}:"]

    def line(ok, text):
        out.append(f"  [{'met' if ok else 'MISSED'}] {text}")

    if ours:
        f = max(ours, key=lambda r: r["real_tps"])
        line(f["mfu"] >= 0.35, f"fastest ({f['name']}): {100 * f['mfu']:.1f}% MFU of the "
                               f"{SHORT_DTYPE[f['dtype']]} roof (>= 35%)")
    if trl is None:
        return out + ["  no TRL row (trl not importable or not selected): nothing to compare the rest against"]
    default = next((r for r in ours if r["name"] == "default"), None)
    if default is not None:
        line(default["real_tps"] >= 2.5 * trl["real_tps"] and default["peak_gb"] <= trl["peak_gb"],
             f"default: {default['real_tps'] / trl['real_tps']:.2f}x TRL tok/s (>= 2.5x) at "
             f"{default['peak_gb'] / trl['peak_gb']:.2f}x its memory (<= 1x)")
    fits = [r for r in ours if r["real_tps"] >= 2.5 * trl["real_tps"]]
    if fits:
        f = min(fits, key=lambda r: r["peak_gb"])
        line(f["peak_gb"] <= 0.25 * trl["peak_gb"],
             f"leanest at 2.5x TRL's speed or better ({f['name']}): {f['peak_gb'] / trl['peak_gb']:.2f}x TRL memory "
             f"(<= 0.25x) at {f['real_tps'] / trl['real_tps']:.2f}x its tok/s (>= 2.5x)")
    elif ours:
        f = min(ours, key=lambda r: r["peak_gb"])
        line(False, f"leanest ({f['name']}): {f['peak_gb'] / trl['peak_gb']:.2f}x TRL memory but only "
                    f"{f['real_tps'] / trl['real_tps']:.2f}x its tok/s (>= 2.5x needed)")
    return out


def format_sweep(points: list[dict]) -> str:
    """The scaling table: one line per (tokens per pair, row), then how each row grows with length."""
    lines = ["| tokens per pair (real) | configuration | step s | real tok/s (spread) | peak GB (spread) "
             "| tok/s vs TRL | mem vs TRL |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        trl = next((r for r in p["rows"] if r["name"] == "trl"), None)
        for r in p["rows"]:
            lines.append(f"| {p['tokens']} ({r['real_per_step'] / p['batch']:.0f}) | {r['name']} | {r['step_s']:.2f} "
                         f"| {r['real_tps']:.0f} ({100 * r['tps_spread']:.0f}%) | {r['peak_gb']:.2f} "
                         f"({100 * r['peak_spread']:.0f}%) | {_ratio(r, trl, 'real_tps')} | {_ratio(r, trl, 'peak_gb')} |")
    lines.append("")
    names = [r["name"] for r in points[0]["rows"]] if points else []
    for name in names:
        series = [(p["tokens"], next((r for r in p["rows"] if r["name"] == name), None)) for p in points]
        series = [(t, r) for t, r in series if r is not None]
        if len(series) < 2:
            continue
        (t0, r0), (t1, r1) = series[0], series[-1]
        work = r1["real_per_step"] / r0["real_per_step"]
        slopes = [f"{(b['peak_gb'] - a['peak_gb']) / ((b['real_per_step'] - a['real_per_step']) / 1000):.2f}"
                  for (_, a), (_, b) in zip(series, series[1:])]
        lines.append(f"growth {name}: {t0} -> {t1} tokens per pair ({work:.1f}x the real tokens per step): step time "
                     f"x{r1['step_s'] / r0['step_s']:.1f}, peak memory x{r1['peak_gb'] / r0['peak_gb']:.2f}; GB per "
                     f"extra 1k real tokens per step between successive lengths: {' then '.join(slopes)} "
                     "(equal when memory is linear in tokens)")
    return "\n".join(lines)


def check_lines(check: dict) -> list[str]:
    lines = [f"correctness (float32, one batch of {check['tokens']} real tokens, |log-probs| up to "
             f"{check['logps_magnitude']:.0f}; target 1e-5):"]
    for path in ("default", "leanest", "padded", "stacked", "packed"):
        c = check[path]
        ok = c["logps_rel"] <= 1e-5 and c["loss_abs"] <= 1e-5
        lines.append(f"  [{'ok' if ok else 'DIFFERS'}] {path} vs naive: policy log-probs max |diff| "
                     f"{c['policy_logps_abs']:.2e}, reference {c['reference_logps_abs']:.2e} (relative "
                     f"{c['logps_rel']:.1e}), loss {c['loss_abs']:.1e}, LoRA gradients relative {c['grad_rel']:.1e}")
    return lines


# ----------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma list of {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--quick", action="store_true", help="tiny random model and short pairs (smoke test)")
    p.add_argument("--model", default=None, help="model dir or alias (default: smollm2-135m-instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 512; --quick 256)")
    p.add_argument("--pairs", type=int, default=None, help="pairs the samplers draw from (default 200; --quick 40)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all linear layers; 0: full fine-tuning")
    p.add_argument("--no-check", action="store_true", help="skip the float32 equality check")
    p.add_argument("--no-subprocess", action="store_true",
                   help="run every configuration in this process (faster; peak memory is then not per row)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every row (TRL last in each round, so rows interleave with it); rows report medians")
    p.add_argument("--sweep", default=None,
                   help="comma list of tokens per pair (e.g. 512,2048,4096): also run the length sweep, prompt-heavy pairs")
    p.add_argument("--sweep-configs", default="default,fastest_bf16,leanest,trl", help="rows of the length sweep")
    p.add_argument("--sweep-batch", type=int, default=2, help="pairs per step in the length sweep")
    p.add_argument("--sweep-steps", type=int, default=None, help="timed steps per sweep row (default: --steps)")
    p.add_argument("--sweep-warmup", type=int, default=None,
                   help="untimed steps first in the sweep (default: --warmup; 0 is fair at long lengths, where "
                        "one-time costs are small beside a step)")
    p.add_argument("--only-sweep", action="store_true", help="skip the main table (and its check)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--profile", action="store_true",
                   help="profile our rows' timed steps (torch.profiler, first round; its overhead slows them) and "
                        "print each kind of op's share of self CPU time")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_setup(args, folder: str) -> Setup:
    from dpo_accel.model.loading import SMOLLM2_ALIAS, resolve_model_path

    common = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, lora_r=args.lora_r,
                  profile=args.profile)
    if args.quick:
        path = args.model or tiny_model_dir(os.path.join(folder, "tiny"))
        return Setup(model_path=path, conversational=False, pairs=args.pairs or 40,
                     max_length=args.max_length or 256, max_prompt_length=128, prompt_words=(2.0, 0.6, 2, 12),
                     answer_words=(2.2, 0.8, 2, 30), quick=True, **common)
    path = resolve_model_path(args.model or SMOLLM2_ALIAS)
    return Setup(model_path=path, pairs=args.pairs or 200, max_length=args.max_length or 512, **common)


INSTRUCTION = "Continue this passage from the Python documentation:\n\n"


def sweep_setup(base: Setup, tokens_per_pair: int, batch: int, steps: int, tokens_per_word: float,
                overhead: int, warmup: Optional[int] = None) -> Setup:
    """Prompt-heavy pairs of about ``tokens_per_pair`` real tokens (chosen + rejected rows), as chat data is:
    each row about 65% prompt, 35% answer, lengths tight around the target (sigma 0.08 of the words) so every
    batch of the epoch costs about the same. ``overhead``: tokens of the instruction and template."""
    row = tokens_per_pair / 2
    prompt_words = max(0.65 * row - overhead, 2) / tokens_per_word
    answer_words = 0.35 * row / tokens_per_word
    return dataclasses.replace(
        base, batch_size=batch, steps=steps, warmup=base.warmup if warmup is None else warmup,
        pairs=batch * ((base.warmup if warmup is None else warmup) + steps) + batch,
        max_length=int(row * 1.3) + overhead, max_prompt_length=int(0.65 * row * 1.3) + overhead,
        prompt_words=(math.log(prompt_words), 0.08, 2, int(prompt_words * 1.3)),
        answer_words=(math.log(answer_words), 0.08, 2, int(answer_words * 1.3)))


def tokens_per_word(tokenizer) -> tuple[float, int]:
    """Tokens per word of the benchmark's prose, and of the instruction plus a chat template's frame (+16)."""
    words = " ".join(english_paragraphs()).split()[:3000]
    per_word = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)
    return per_word, len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]) + 16


def run_rounds(setup: Setup, names: list[str], folder: str, repeats: int, in_process: bool,
               tag: str = "", progress: Optional[str] = None) -> dict[str, list[dict]]:
    """Every row once per round, TRL last, `repeats` rounds: A B .. T A B .. T, so each row's repeats and
    TRL's interleave and a drift of the machine's load touches both. A row that is skipped (TRL without
    trl installed) is not tried again. ``progress``: a JSON file rewritten after every run with all raw
    results so far (a long run stopped early keeps what it measured)."""
    order = [n for n in names if CONFIGS[n]["kind"] != "trl"] + [n for n in names if CONFIGS[n]["kind"] == "trl"]
    results: dict[str, list[dict]] = {n: [] for n in order}
    for rep in range(repeats):
        for name in order:
            if results[name] and "skipped" in results[name][0]:
                continue
            start = time.perf_counter()
            print(f"... {tag}{name}{f' (round {rep + 1}/{repeats})' if repeats > 1 else ''}", end="", flush=True)
            results[name].append(launch(setup, name, folder, in_process))
            print(f" {time.perf_counter() - start:.0f} s", flush=True)
            if progress:
                saved = {}
                if os.path.isfile(progress):
                    with open(progress) as f:
                        saved = json.load(f)
                saved[tag or "main"] = {"setup": dataclasses.asdict(setup), "results": results}
                with open(progress, "w") as f:
                    json.dump(saved, f)
    return results


def summarise_rounds(results: dict[str, list[dict]], roof: dict, warmup: int, notes: list[str],
                     tag: str = "") -> list[dict]:
    """Median rows (`median_row`) of the rows whose every repeat ran; the others go to the notes."""
    ok = {}
    for name, reps in results.items():
        bad = [r for r in reps if "skipped" in r or "failed" in r]
        if bad:
            notes.append(f"{tag}{name}: {bad[0].get('skipped') or bad[0].get('failed')}")
        else:
            ok[name] = [summarise(name, r, roof, warmup) for r in reps]
    trl = ok.get("trl")
    return [median_row(reps, trl) for reps in ok.values()]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def launch(setup: Setup, name: str, folder: str, in_process: bool) -> dict:
    """One configuration, in a fresh subprocess unless `in_process`."""
    if in_process:
        try:
            return run_worker(setup, name)
        finally:
            _reset_accelerate()
    out = os.path.join(folder, f"{name}.json")
    cmd = [sys.executable, "-m", "benchmarks.bench_dpo_step", "--worker", name,
           "--setup", json.dumps(dataclasses.asdict(setup)), "--out", out]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return {"failed": f"exit {proc.returncode}:\n{tail}"}
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.setup).items()})
        result = run_worker(setup, args.worker)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    sweep_names = [n.strip() for n in args.sweep_configs.split(",") if n.strip()]
    unknown = [n for n in sweep_names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown sweep configuration(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    sweep = [int(t) for t in args.sweep.split(",")] if args.sweep else []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet()
    results, rows, notes, check, points = {}, [], [], None, []
    progress = args.json + ".partial" if args.json else None
    if progress and os.path.isfile(progress):
        os.remove(progress)
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as folder:
        setup = make_setup(args, folder)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(setup)
        dataset = tokenized_dataset(setup, tokenizer, build_pairs(setup, tokenizer))
        lengths = [len(dataset[i]["chosen_input_ids"]) + len(dataset[i]["rejected_input_ids"]) for i in range(len(dataset))]
        print(f"model {setup.model_path} | {'LoRA r=%d all-linear' % setup.lora_r if setup.lora_r else 'full fine-tuning'}"
              f" | {setup.pairs} pairs of English prose, {statistics.mean(lengths):.0f} tokens per pair on average "
              f"(max sequence {max(max(len(dataset[i]['chosen_input_ids']), len(dataset[i]['rejected_input_ids'])) for i in range(len(dataset)))}"
              f", max_length {setup.max_length}) | batch {setup.batch_size} pairs | {setup.warmup} warm-up + "
              f"{setup.steps} timed steps | {args.repeats} round(s) | {device} ({torch.get_num_threads()} threads) "
              f"| torch {torch.__version__} | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        roof = measure_roof(device)
        if not args.only_sweep:
            rounds = run_rounds(setup, names, folder, args.repeats, args.no_subprocess, progress=progress)
            results = {n: reps[0] for n, reps in rounds.items()}
            for name, reps in rounds.items():
                r = reps[0]
                if "ours_real" in r and r["ours_real"] != r["real"]:
                    notes.append(f"{name}: TRL's real tokens per step {r['real']} vs dpo_accel's {r['ours_real']} "
                                 "for the same pairs (chat-template tokenisation differs slightly)")
            if not args.no_check:
                print("... check", end="", flush=True)
                start = time.perf_counter()
                check = launch(setup, "check", folder, args.no_subprocess)
                print(f" {time.perf_counter() - start:.0f} s", flush=True)
                results["check"] = check
        per_word, overhead = tokens_per_word(tokenizer) if sweep else (0.0, 0)
        sweep_rounds = {}
        for tokens in sweep:
            point = sweep_setup(setup, tokens, args.sweep_batch, args.sweep_steps or args.steps, per_word, overhead,
                                args.sweep_warmup)
            sweep_rounds[tokens] = (point, run_rounds(point, sweep_names, folder, args.repeats, args.no_subprocess,
                                                      tag=f"{tokens} tokens/pair: ", progress=progress))
        after = measure_roof(device)  # the machine's best: other load on a shared machine only lowers it
        roof = {k: max(roof[k], after[k]) for k in roof}
        if not args.only_sweep:
            rows = summarise_rounds(rounds, roof, setup.warmup, notes)
        for tokens, (point, point_rounds) in sweep_rounds.items():
            points.append({"tokens": tokens, "batch": point.batch_size, "setup": dataclasses.asdict(point),
                           "rows": summarise_rounds(point_rounds, roof, point.warmup, notes, f"{tokens} tokens/pair: "),
                           "raw": point_rounds})
        trl = next((r for r in rows if r["name"] == "trl"), None)
        for r in rows:
            if r["precomputed"]:
                vs = f" ({r['one_epoch_tps'] / trl['real_tps']:.2f}x TRL)" if trl else ""
                notes.append(f"{r['name']}: reference pre-pass {r['prepass_s']:.2f} s per batch, run once per dataset "
                             f"and model and cached across runs and epochs; paid within a single epoch it gives "
                             f"{r['one_epoch_tps']:.0f} real tok/s{vs}")

    if rows:
        print()
        print(format_table(rows, roof, args.no_subprocess))
        for line in target_lines(rows):
            print(line)
    for line in profile_lines(results):
        print(line)
    if check is not None:
        if "failed" in check:
            notes.append(f"check: {check['failed']}")
        else:
            for line in check_lines(check):
                print(line)
    if points:
        print(f"\nlength sweep: batch {args.sweep_batch} pair(s), prompt-heavy pairs (about 65% prompt), "
              f"{points[0]['setup']['warmup']} warm-up + {args.sweep_steps or args.steps} timed step(s), "
              f"{args.repeats} round(s)")
        print(format_sweep(points))
        for p in points:
            for line in target_lines(p["rows"], f"targets at {p['tokens']} tokens per pair"):
                print(line)
    for note in notes:
        print(f"note: {note}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": dataclasses.asdict(setup), "roof": roof, "rows": rows, "raw": results,
                       "repeats": {n: reps for n, reps in rounds.items()} if not args.only_sweep else {},
                       "sweep": points}, f, indent=1)
    failed = [n for n, r in results.items() if isinstance(r, dict) and "failed" in r]
    failed += [n for p in points for n, reps in p["raw"].items() if any("failed" in r for r in reps)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
