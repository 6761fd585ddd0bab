"""benchmarks/gpu_check.py on a machine without a GPU: it imports, says there is no GPU and exits 0; its
budget, table, subprocess and search logic (what a lent GPU would run) work on fake checks; its reference
pairs give the separate forwards' log-probs that the packed layout reproduces; and the helpers of its
checks run here on the CPU, on tiny models, with the checks' own tolerances: the layout report, the
vision layouts, the model.dtype auto step, the longest-pair step and inspect's estimate of it."""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.pair_batches import separate_logps, shared_prompt_batch


def test_without_a_gpu_it_says_so_and_exits_cleanly(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "t.md")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "t.md").exists()


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.budget_s == 480 and args.out == "gpu_check.md" and args.only is None
    assert gpu_check.parse_args(["--only", "bf16_autocast,fsdp2"]).only == "bf16_autocast,fsdp2"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "bf16_autocast,warp_drive"])
    every = ",".join(c.name for c in gpu_check.CHECKS)
    assert gpu_check.parse_args(["--only", every]).only == every


def test_the_check_list_fits_the_budget_most_informative_first():
    names = [c.name for c in gpu_check.CHECKS]
    assert len(set(names)) == len(names)
    assert names[:3] == ["model_dtype_auto", "layout_cost", "vision_layouts"]
    assert names.index("longest_sequence") < names.index("bench_smollm2") < names.index("bench_1b")
    total = sum(c.minimum_s for c in gpu_check.CHECKS)
    assert total <= gpu_check.parse_args([]).budget_s and f"({total:.0f} of 480 s)" in gpu_check.__doc__
    assert all(f"\n    {name}" in gpu_check.__doc__ for name in names[:-3])  # the docstring lists every check
    assert all(c.maximum_s is not None and 0 < c.minimum_s <= c.maximum_s for c in gpu_check.CHECKS)
    rows = set(gpu_check.BENCH_ROWS.split(","))
    assert rows == {"default", "default_fp32", "fastest_bf16", "leanest", "compile_bf16"}
    from benchmarks.bench_dpo_step import CONFIGS

    assert rows <= set(CONFIGS)


def test_checks_report_ok_skipped_failed_partial_and_not_run_within_the_budget(tmp_path):
    def ok(ctx):
        return "fine | really"

    def skip(ctx):
        raise gpu_check.Skip("flash_attn is not installed")

    def broken(ctx):
        raise AssertionError("values 3e-2")

    def cut(ctx):
        raise gpu_check.Partial("the time budget stopped it after 2 row(s)")

    def own_share(ctx):
        return f"{ctx.left():.1f}"

    checks = [gpu_check.Check("a", ok, 0), gpu_check.Check("b", skip, 0), gpu_check.Check("c", broken, 0),
              gpu_check.Check("d", ok, 10_000), gpu_check.Check("e", cut, 0), gpu_check.Check("f", own_share, 0, 5)]
    ctx = gpu_check.Context(folder=str(tmp_path), deadline=time.monotonic() + 60)
    results = gpu_check.run_checks(checks, ctx)
    assert [r.status for r in results] == ["ok", "skipped", "FAILED", "not run", "partial", "ok"]
    assert "AssertionError: values 3e-2" in results[2].detail and "time budget" in results[3].detail
    assert float(results[5].detail) <= 5 and ctx.check_deadline is None and ctx.left() > 30
    table = gpu_check.format_table(results, "GPU check, test")
    lines = table.splitlines()
    assert lines[0] == "GPU check, test" and lines[2] == "| check | status | detail | s |"
    assert "| a | ok | fine / really |" in table  # a '|' in a detail cannot break the table
    assert all(line.count("|") == 5 for line in lines[2:])


def test_a_process_past_its_time_is_killed_and_its_output_kept():
    assert gpu_check.run_process([sys.executable, "-c", "print('hi')"], 60) == (0, "hi\n")
    start = time.monotonic()
    code, out = gpu_check.run_process([sys.executable, "-c", "import time; print('started', flush=True); "
                                       "time.sleep(60)"], 2)
    assert code is None and "started" in out and time.monotonic() - start < 30


def test_bench_lines_read_the_results_or_what_a_cut_run_left(tmp_path):
    out = str(tmp_path / "bench.json")
    assert gpu_check.bench_lines(out) == ([], [])
    raw = {"times": [9.0, 1.0, 3.0], "real": [100, 1000, 2000], "peak": 2 * 2 ** 30, "dtype": "bfloat16",
           "layout": "packed_shared"}
    with open(out + ".partial", "w") as f:
        json.dump({"main": {"setup": {"warmup": 1}, "results": {
            "default": [raw], "compile_bf16": [{"failed": "exit 1:\nTraceback\nRuntimeError: no triton"}],
            "leanest": []}}}, f)
    rows, problems = gpu_check.bench_lines(out)
    assert rows == ["default 750 tok/s, step 2.00 s, 2.0 GB, MFU n/a (cut before the roof), bf16, packed_shared"]
    assert problems == ["compile_bf16 FAILED: RuntimeError: no triton"]
    with open(out, "w") as f:
        json.dump({"rows": [{"name": "default", "real_tps": 750.0, "step_s": 2.0, "peak_gb": 2.0, "mfu": 0.31,
                             "dtype": "bfloat16"}], "raw": {"default": raw, "trl": {"skipped": "trl missing"}}}, f)
    rows, problems = gpu_check.bench_lines(out)
    assert rows == ["default 750 tok/s, step 2.00 s, 2.0 GB, MFU 31%, bf16, packed_shared"]
    assert problems == ["trl skipped: trl missing"]


def test_pair_batches_of_the_checks():
    from dpo_accel.model.logps import processed_tokens, shared_prefix_lengths

    batch = gpu_check.random_pairs(5, (10, 20), (3, 6), vocab=49152, seed=4)
    c, r = batch["chosen_attention_mask"].sum(-1), batch["rejected_attention_mask"].sum(-1)
    assert batch["chosen_input_ids"].shape[0] == 5 and bool(((c >= 14) & (c <= 27) & (r >= 14) & (r <= 27)).all())
    prompt = shared_prefix_lengths(batch)
    assert bool(((prompt >= 10) & (prompt <= 20)).all())
    assert bool((batch["chosen_labels"][:, :10] == -100).all()) and bool((batch["chosen_labels"] != -100).any())
    for n in (64, 4096, 10_000):
        one = gpu_check.prompt_heavy_pair(n, 49152, "cpu")
        assert one["chosen_input_ids"].shape == (1, n)
        assert processed_tokens(one, "packed_shared") == gpu_check.pair_tokens(n)


def test_model_configs_have_their_sizes():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        smol = LlamaForCausalLM(gpu_check.smollm2_config())
    assert abs(sum(p.numel() for p in smol.parameters()) - 134.5e6) < 0.5e6  # SmolLM2-135M
    assert gpu_check.one_b_config(49152).num_hidden_layers == 22


def test_cost_text_says_what_the_fit_found_or_why_there_is_none():
    from dpo_accel.model.logps import LayoutCost, PathDecision

    probe = gpu_check.random_pairs(4, (8, 16), (2, 6), vocab=320)
    decision = PathDecision()
    decision.sharing, decision.pack_pairs, decision.padded_exact = True, True, True
    text = gpu_check.cost_text(decision, probe, flex=True)
    assert "no cost fitted" in text and "1 attention call(s) per layer and a padded row per pair 1" in text
    decision.cost = LayoutCost(2e-4, 3e-7, ("packed_shared", "shared"), False)
    assert gpu_check.cost_text(decision, probe, flex=False).startswith("fitted 200 us per attention call + 300 ns")
    decision.padded_exact = False
    assert "no cost to fit" in gpu_check.cost_text(decision, probe, flex=True)


def test_the_layout_report_runs_here_on_a_tiny_llama():
    """layout_findings on the CPU (SDPA per pair, so a cost is fitted): each batch's layout exact within the
    check's tolerances, and both layouts timed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                         attn_implementation="sdpa"))
    probe = gpu_check.random_pairs(8, (4, 24), (2, 12), 320, seed=1)
    batches = {"short-pairs": gpu_check.random_pairs(12, (2, 6), (1, 4), 320, seed=2),
               "long-pairs": gpu_check.random_pairs(2, (60, 90), (20, 40), 320, seed=3)}
    with gpu_check.exact_float32():
        lines = gpu_check.layout_findings(model, probe, batches, "cpu")
    assert len(lines) == 3 and lines[0].startswith("settled on 8 pairs")
    for line, label in zip(lines[1:], batches):
        assert line.startswith(f"{label} batch") and ", exact (log-probs" in line and "ms vs padded" in line


def test_the_vision_check_runs_here_and_leaves_families_out_when_time_is_short(tmp_path):
    """The vision check on the CPU with 5 s left: LLaVA and Qwen2-VL always run (float32 within the check's
    tolerances), the other families are reported as not run."""
    ctx = gpu_check.Context(folder=str(tmp_path), deadline=time.monotonic() + 5, device="cpu")
    detail = gpu_check.check_vision_layouts(ctx)
    assert detail.startswith("shared vs stacked, float32 (TF32 off) on cpu") and "LLaVA " in detail, detail
    assert "Qwen2-VL " in detail and "; not run (time): Qwen2.5-VL, Idefics3" in detail, detail


def test_model_dtype_auto_step_here(tmp_path):
    """The dtypes a step finds with model.dtype auto are the check's expectation for this machine's units (the
    CPU's: bf16 where it has AMX-BF16 or AVX512-BF16)."""
    from benchmarks.bench_dpo_step import tiny_model_dir

    from dpo_accel.model.speed import bf16_matrix_units

    path = tiny_model_dir(str(tmp_path / "tiny"))
    units = bf16_matrix_units(False)
    for lora in (True, False):
        found = gpu_check.dtype_step(path, lora, "cpu")
        want = gpu_check.dtype_expectation(lora, units)
        assert found["stepped"] > 0 and {k: found[k] for k in want} == want, (lora, found)


def test_pair_step_and_inspects_estimate_run_here(tmp_path):
    """The longest-pair check's step (all three methods) on a tiny model, and inspect's estimate for it."""
    from benchmarks.bench_dpo_step import tiny_model_dir

    path = tiny_model_dir(str(tmp_path / "tiny"))
    for method in ("naive", "default", "leanest"):
        peaks: dict = {}
        step = gpu_check.pair_step(path, method, peaks, "cpu")
        assert gpu_check.longest_fitting(step, 32, 64, time.monotonic() + 60) == (64, "reached the cap 64")
        assert set(peaks) == {32, 64}
    found = {m: gpu_check.inspect_longest(path, m, 1.5) for m in ("default", "leanest")}
    assert found["default"][1] == "shared" and 512 <= found["default"][0] <= found["leanest"][0], found
    line = gpu_check.longest_line("default", (64, "reached the cap 64"), {64: 0.5}, {"default": found["default"][0]})
    assert line.startswith("default: 64 tokens per row = 87 per pair, peak 0.5 GiB (reached the cap 64); inspect")
    assert gpu_check.longest_line("naive", (0, "out of memory at 4096"), {}, {}) == \
        "naive: not even the first length fits (out of memory at 4096)"


def test_the_checks_reference_pairs_are_what_the_packed_layout_reproduces():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_accel.model.logps import concatenated_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                         attn_implementation="sdpa")).double()
    batch = shared_prompt_batch()
    with torch.no_grad():
        reference = separate_logps(model, batch)
        packed = concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(packed[key], reference[key], atol=1e-10, rtol=0)
