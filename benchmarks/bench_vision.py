"""Each pair's image and prompt run once, against stacked rows: forward + backward time of vision preference
batches, shared against stacked, interleaved.

    python -m benchmarks.bench_vision                   # the shapes recipe's model and data, 8 pairs, 3 rounds
    python -m benchmarks.bench_vision --model DIR --repeats 1 --batches 1   # another VLM (a tiny one: CI)

Both layouts run the recipe's policy (recipes/tiny_vlm_shapes.yaml: the tiny offline LLaVA, LoRA on the
language model, the projector trained, ``model.dtype: auto``, bf16 autocast) on the same collated
micro-batches of the shapes training pairs; each round times every batch in one layout, then the other
(shared, stacked, shared, stacked, ...) after one untimed step each. Reported per layout: the median over
the rounds of seconds per micro-batch, and the tokens the language model ran per micro-batch (stacked:
[2B, T] rows; shared: one row per pair, its prompt with its image tokens once).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

RECIPE = "recipes/tiny_vlm_shapes.yaml"


def setup(args):
    """(policy, batches) as the recipe trains them."""
    from dpo_accel.config.load import load_recipe
    from dpo_accel.config.plan import preflight
    from dpo_accel.data.vision import VisionPreferenceCollator, load_vision_splits, tokenize_vision_splits
    from dpo_accel.model.loading import load_processor, load_vision_policy, resolve_model_path

    sets = [f"train.output_dir={args.output_dir}"] + ([f"model.model_name_or_path={args.model}"] if args.model else [])
    recipe = preflight(load_recipe(RECIPE, sets)).recipe
    path = resolve_model_path(recipe.model.model_name_or_path)
    processor = load_processor(recipe.model, path)
    splits = load_vision_splits(recipe.data, recipe.train.seed)
    tokenized, _ = tokenize_vision_splits(splits, processor, recipe.data)
    train, size = tokenized["train"], args.pairs
    collate = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)
    batches = [collate([train[i] for i in range(b * size, (b + 1) * size)]) for b in range(args.batches)]
    return load_vision_policy(recipe.model, recipe.lora, path).train(), batches


def step_seconds(policy, batch: dict, layout: str) -> float:
    from dpo_accel.model.vision import vision_concatenated_logps

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vision_concatenated_logps(policy, batch, layout=layout)
    (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def language_tokens(batch: dict, layout: str) -> int:
    from dpo_accel.model.logps import processed_tokens

    return processed_tokens(batch, "shared" if layout == "shared" else "concat")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="another VLM (HF folder) with the recipe's settings")
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--batches", type=int, default=3, help="micro-batches timed per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", default="/tmp/dpo_accel_bench_vision")
    p.add_argument("--json")
    args = p.parse_args(argv)
    policy, batches = setup(args)
    layouts = ("shared", "stacked")
    for layout in layouts:
        step_seconds(policy, batches[0], layout)  # untimed: first-call allocations
    rounds = {layout: [] for layout in layouts}
    for _ in range(args.repeats):
        for layout in layouts:
            rounds[layout].append(statistics.mean(step_seconds(policy, b, layout) for b in batches))
    summary = {layout: {"seconds_per_batch": statistics.median(rounds[layout]),
                        "language_tokens_per_batch": statistics.mean(language_tokens(b, layout) for b in batches)}
               for layout in layouts}
    summary["speedup"] = summary["stacked"]["seconds_per_batch"] / summary["shared"]["seconds_per_batch"]
    for layout in layouts:
        s = summary[layout]
        print(f"{layout:<8} {s['seconds_per_batch']:.3f} s per micro-batch of {args.pairs} pairs, "
              f"{s['language_tokens_per_batch']:.0f} language-model tokens")
    print(f"stacked / shared time: {summary['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
