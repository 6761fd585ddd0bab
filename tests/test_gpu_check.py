"""benchmarks/gpu_check.py on a machine without a GPU: it imports, says there is no GPU and exits 0; its
budget, table and search logic (what a lent GPU would run) work on fake checks; its reference pairs give
the separate forwards' log-probs that the packed layout reproduces."""
from __future__ import annotations

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


def test_checks_report_ok_skipped_failed_and_not_run_within_the_budget(tmp_path):
    def ok(ctx):
        return "fine | really"

    def skip(ctx):
        raise gpu_check.Skip("flash_attn is not installed")

    def broken(ctx):
        raise AssertionError("values 3e-2")

    checks = [gpu_check.Check("a", ok, 0), gpu_check.Check("b", skip, 0), gpu_check.Check("c", broken, 0),
              gpu_check.Check("d", ok, 10_000)]
    ctx = gpu_check.Context(folder=str(tmp_path), deadline=time.monotonic() + 60)
    results = gpu_check.run_checks(checks, ctx)
    assert [r.status for r in results] == ["ok", "skipped", "FAILED", "not run"]
    assert "AssertionError: values 3e-2" in results[2].detail and "time budget" in results[3].detail
    table = gpu_check.format_table(results, "GPU check, test")
    lines = table.splitlines()
    assert lines[0] == "GPU check, test" and lines[2] == "| check | status | detail | s |"
    assert "| a | ok | fine / really |" in table  # a '|' in a detail cannot break the table
    assert all(line.count("|") == 5 for line in lines[2:])


def test_longest_fitting_doubles_then_bisects_to_the_memory_limit():
    tried = []

    def try_length(n):
        tried.append(n)
        if n > 10_000:
            raise torch.cuda.OutOfMemoryError("fake")

    best, why = gpu_check.longest_fitting(try_length, 1024, 131072, time.monotonic() + 60)
    assert 9_000 < best <= 10_000 and why == "out of memory at 10240"
    assert tried[:5] == [1024, 2048, 4096, 8192, 16384]
    best, why = gpu_check.longest_fitting(lambda n: None, 1024, 4096, time.monotonic() + 60)
    assert (best, why) == (4096, "reached the cap 4096")
    assert gpu_check.longest_fitting(lambda n: None, 1024, 4096, time.monotonic() - 1) == (0, "time budget")


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
    assert [c.name for c in gpu_check.CHECKS][:2] == ["bf16_autocast", "packed_pairs_flex"]
    assert gpu_check.one_b_config(49152).num_hidden_layers == 22
