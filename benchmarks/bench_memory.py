"""Where the memory of a long pair goes: one leanest step (gradient checkpointing, 128-position LM-head chunks,
bf16 base + autocast, packed pairs) at several lengths, with the tensors autograd keeps for the backward
counted one by one and the process's memory measured with glibc's allocator as it is and with freed
memory returned to the system at once.

    python -m benchmarks.bench_memory                       # SmolLM2-135M-Instruct, LoRA r=16, 1024 and 3072 tokens
    python -m benchmarks.bench_memory --lengths 1024,2048,4096 --model DIR

Per length (each allocator setting in its own process, lengths in rising order, one pair per step, about
65% prompt):

    saved MiB          bytes of the distinct storages autograd saved for the backward (torch's
                       saved_tensors_hooks): what the step must keep, which grows with tokens
    RSS +fwd / +bwd    the process's resident memory after the forward / the backward, above before the step
    peak GiB           the process's peak resident memory so far (VmHWM)

``glibc`` runs the allocator as it is; ``returned`` sets MALLOC_MMAP_THRESHOLD_=65536, so every block of
64 KiB or more is mapped on its own and unmapped when freed (glibc's default raises that threshold to the
largest block freed, up to 32 MiB, after which freed blocks stay in the heap). The difference between the
two rows is memory the allocator keeps, not memory the step needs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"glibc": {}, "returned": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def pair_batch(tokens: int) -> dict:
    """One prompt-heavy pair of about `tokens` real tokens (chosen + rejected rows), random ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = int(tokens * 0.65) // 2
    answer = tokens // 2 - prompt
    shared = torch.randint(100, 40000, (prompt,), generator=g)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.cat([shared, torch.randint(100, 40000, (answer,), generator=g)])
        labels = ids.clone()
        labels[:prompt] = -100
        batch.update({f"{side}_input_ids": ids[None], f"{side}_attention_mask": torch.ones_like(ids)[None],
                      f"{side}_labels": labels[None]})
    return batch


def measure(model_path: str, lengths: list[int]) -> list[dict]:
    """In this process: the leanest step at each length; rows of the module docstring's columns."""
    import resource

    import psutil
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpo_accel.model.logps import concatenated_logps

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    rows, process = [], psutil.Process()
    for tokens in lengths:
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        before = process.memory_info().rss
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = concatenated_logps(model, pair_batch(tokens), chunk_size=128, prefix_sharing=True, pack_pairs=True)
        after_forward = process.memory_info().rss
        (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
        rows.append({"tokens": tokens, "saved_mib": sum(saved.values()) / 2**20,
                     "rss_forward_mib": (after_forward - before) / 2**20,
                     "rss_backward_mib": (process.memory_info().rss - before) / 2**20,
                     "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        model.zero_grad(set_to_none=True)
    return rows


def per_thousand(rows: list[dict], key: str) -> float:
    """Growth of `key` per extra 1,000 tokens between the shortest and the longest length."""
    first, last = rows[0], rows[-1]
    return (last[key] - first[key]) / (last["tokens"] - first["tokens"]) * 1000


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", default="1024,3072")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    if args.child:
        print(json.dumps(measure(args.model, lengths)))
        return {}
    if not args.model:
        from dpo_accel.model.loading import SMOLLM2_ALIAS, resolve_model_path

        args.model = resolve_model_path(SMOLLM2_ALIAS)
    results = {}
    for name, env in SETTINGS.items():
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", "--model", args.model, "--lengths",
               ",".join(map(str, lengths))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| allocator | tokens | saved MiB | RSS +fwd MiB | RSS +bwd MiB | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['tokens']} | {r['saved_mib']:.0f} | {r['rss_forward_mib']:.0f} | "
                  f"{r['rss_backward_mib']:.0f} | {r['peak_gib']:.2f} |")
    for name, rows in results.items():
        print(f"{name}: per extra 1k tokens saved {per_thousand(rows, 'saved_mib'):.0f} MiB, peak "
              f"{per_thousand(rows, 'peak_gib') * 1024:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
