"""Sampling speed of online / iterative DPO against a plain ``transformers`` generate of the same prompts.

    python -m benchmarks.bench_generation                       # the online recipe's sampling, 3 rounds
    python -m benchmarks.bench_generation --prompts 8 --samples 4 --max-new-tokens 24 --repeats 3
    python -m benchmarks.bench_generation --model DIR --repeats 1   # another model (a tiny one: the CI smoke test)

Both rows sample the same prompts of the shipped arithmetic task with the same policy (SmolLM2-135M-Instruct,
LoRA r=16 all-linear, ``model.dtype: auto``, bf16 autocast as the recipe runs it), temperature 1, k samples
per prompt in one call, the KV cache on:

    dpo_accel   evaluation.generation.generate_answers as the online loop calls it (prompts tokenised as in
                training, left-padded, seeded sampling stream, token ids returned)
    plain       model.generate on the same left-padded ids with num_return_sequences=k, nothing else

Rows alternate within each round (dpo_accel, plain, dpo_accel, plain, ...) after one untimed call each.
Reported per row: the median over the rounds of generated tokens/s (tokens up to and with each answer's
stop token; what a row generates past a stop is padding and not counted) and of seconds per call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def load_policy_and_prompts(args):
    """(policy, tokenizer, prompts): the online recipe's policy (or a tiny random Llama with --quick)."""
    from dpo_accel.config.load import load_recipe
    from dpo_accel.config.plan import preflight
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.model.loading import load_policy, load_tokenizer, resolve_model_path

    sets = [f"train.output_dir={args.output_dir}"] + (["model.model_name_or_path=" + args.model] if args.model else [])
    recipe = preflight(load_recipe(args.recipe, sets)).recipe  # settles model.dtype auto
    path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(recipe.model, path)
    policy = load_policy(recipe.model, recipe.lora, path)
    prompts = load_preference_splits(recipe.data, recipe.train.seed)["train"]["prompt"][:args.prompts]
    return policy, tokenizer, prompts, recipe


def plain_generate(model, tokenizer, prompts, args, seed: int) -> int:
    """Generated tokens (up to and with each stop) of one plain model.generate call."""
    from dpo_accel.data.tokenize import prompt_input_ids
    from dpo_accel.evaluation.generation import stop_tokens

    rows = [prompt_input_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    stops = stop_tokens(model, tokenizer)
    torch.manual_seed(seed)
    model.eval()
    model.config.use_cache = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=True,
                             temperature=1.0, top_p=1.0, num_return_sequences=args.samples,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    return sum(answer_length(row.tolist(), stops) for row in out[:, width:])


def answer_length(generated: list, stops: list) -> int:
    end = next((j for j, t in enumerate(generated) if t in stops), None)
    return len(generated) if end is None else end + 1


def ours(model, tokenizer, prompts, args, seed: int) -> int:
    from dpo_accel.evaluation.generation import generate_answers

    answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, autocast=lambda: torch.autocast(
        "cpu", dtype=torch.bfloat16), temperature=1.0, num_return_sequences=args.samples, seed=seed,
        return_tokens=True)
    return sum(len(a.answer_ids) for a in answers)


def measure(args) -> dict:
    policy, tokenizer, prompts, recipe = load_policy_and_prompts(args)
    rows = {"dpo_accel": ours, "plain": plain_generate}
    for fn in rows.values():
        fn(policy, tokenizer, prompts, args, 0)  # untimed: first-call allocations
    results = {name: [] for name in rows}
    for round_ in range(args.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            tokens = fn(policy, tokenizer, prompts, args, round_ + 1)
            seconds = time.perf_counter() - start
            results[name].append((tokens / seconds, seconds, tokens))
    summary = {name: {"tokens_per_second": statistics.median(r[0] for r in runs),
                      "seconds_per_call": statistics.median(r[1] for r in runs),
                      "tokens_per_call": statistics.median(r[2] for r in runs)} for name, runs in results.items()}
    summary["ratio"] = summary["dpo_accel"]["tokens_per_second"] / summary["plain"]["tokens_per_second"]
    summary["setup"] = {"prompts": len(prompts), "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                        "dtype": recipe.model.dtype, "threads": torch.get_num_threads(), "repeats": args.repeats}
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/smollm2_arith_online.yaml")
    p.add_argument("--model", help="another model (HF folder) with the recipe's settings")
    p.add_argument("--prompts", type=int, default=8, help="prompts per call (the recipe's per-device batch)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (train.online_generations)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", default="/tmp/dpo_accel_bench_generation")
    p.add_argument("--json", help="write the summary here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = measure(args)
    for name in ("dpo_accel", "plain"):
        s = summary[name]
        print(f"{name:<10} {s['tokens_per_second']:8.1f} generated tok/s  {s['seconds_per_call']:6.2f} s per call  "
              f"{s['tokens_per_call']:.0f} tokens per call")
    print(f"dpo_accel / plain: {summary['ratio']:.2f}  ({json.dumps(summary['setup'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
