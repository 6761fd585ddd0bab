"""Speed and memory options (dpo_accel.model.speed and the recipe keys behind them) and the benchmark's smoke run.

What each test proves, on CPU with tiny models:
- gradient checkpointing (non-reentrant) with LoRA through the lean log-prob path keeps far fewer
  activations and gives the same log-probs and LoRA gradients;
- train.torch_compile compiles the decoder in place (parameter names unchanged) and gives the same
  packed log-probs and gradients (dynamo's "eager" backend here: TorchInductor's C++ build takes
  minutes on 2 cores; the benchmark's `compile` row runs inductor);
- the micro-batch search walks the divisors of the global batch and retries only on out-of-memory errors;
- in the real loop, packing (train.padding_free) + gradient checkpointing + auto_find_batch_size (an
  out-of-memory error forced above 2 pairs) train exactly like the plain 4-pair run;
- QLoRA and torch.compile are refused with one line where they cannot run;
- model.dtype auto: bf16 frozen base weights under LoRA where the device has bf16 matrix units (the adapter
  and optimizer state float32), float32 elsewhere and for weights that train in full; a resume keeps the
  checkpoint's dtype;
- the benchmark runs end to end (--quick, TRL absent) and its float32 check holds.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import paired_steps, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.model import speed
from dpo_accel.model.logps import PreferenceLogpsModel
from dpo_accel.model.loading import load_policy
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe
from dpo_accel.config.plan import preflight

OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes."


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama (vocab 320) saved as a HF folder, so load_policy's real path is used."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)  # sharp logits, so a wrong path shows in the log-probs
    path = str(tmp_path_factory.mktemp("small_llama"))
    model.save_pretrained(path)
    return path


def lora_policy(path: str, **model_keys):
    sets = [f"model.model_name_or_path={path}", "lora.use_peft=true", "lora.lora_r=4", "lora.lora_dropout=0.0"]
    sets += [f"model.{k}={v}" for k, v in model_keys.items()]
    recipe = load_recipe(None, sets)
    policy = load_policy(recipe.model, recipe.lora, path).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same adapter every time, with B away from 0 so it matters
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return policy


def make_batch(B=3, T=24, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for s, side in enumerate(("chosen", "rejected")):
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for b in range(B):
            n = T - 3 * b - s
            ids[b, :n] = torch.randint(3, 320, (n,), generator=g)
            ids[b, n - 1] = 2
            mask[b, :n] = 1
            labels[b, 6:n] = ids[b, 6:n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def logps_and_grads(policy, batch, **opts):
    module = PreferenceLogpsModel(policy, chunk_size=16, **opts)
    out = module(**batch)
    (out["chosen_logps"].sum() - 0.5 * out["rejected_logps"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad(set_to_none=True)
    return torch.cat([out["chosen_logps"], out["rejected_logps"]]).detach(), grads


def saved_activation_bytes(policy, batch) -> int:
    """Bytes autograd keeps for backward during one forward of the lean path (outside checkpoints)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = PreferenceLogpsModel(policy, chunk_size=16)(**batch)
    out["chosen_logps"].sum().backward()
    policy.zero_grad(set_to_none=True)
    return total[0]


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


def adapter_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "adapter", "adapter_model.safetensors"))


# ------------------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_with_lora_through_the_lean_path(small_llama_dir):
    batch = make_batch()
    plain = lora_policy(small_llama_dir)
    ckpt = lora_policy(small_llama_dir, gradient_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in ckpt.get_base_model().model.layers)
    a_logps, a_grads = logps_and_grads(plain, batch)
    b_logps, b_grads = logps_and_grads(ckpt, batch)
    torch.testing.assert_close(b_logps, a_logps, atol=1e-5, rtol=1e-6)
    assert a_grads.keys() == b_grads.keys() and len(a_grads) > 0
    for name in a_grads:
        assert a_grads[name].abs().sum() > 0 or "lora_A" in name  # B != 0: every LoRA matrix gets a gradient
        torch.testing.assert_close(b_grads[name], a_grads[name], atol=1e-5, rtol=1e-4)
    # The memory is really saved: the decoder layers keep their activations only inside checkpoints.
    assert saved_activation_bytes(ckpt, batch) < 0.3 * saved_activation_bytes(plain, batch)


# ---------------------------------------------------------------------------------- torch.compile

def test_compiled_decoder_matches_eager_with_lora_and_packing(small_llama_dir):
    """train.torch_compile through apply_speed_options (what train.py calls), packed rows of varying length."""
    torch._dynamo.reset()
    batch = make_batch()
    eager = lora_policy(small_llama_dir)
    compiled = lora_policy(small_llama_dir)
    recipe = load_recipe(None, ["train.torch_compile=true", "train.torch_compile_backend=eager"])
    speed.apply_speed_options(None, recipe, PreferenceLogpsModel(compiled), None, 0)
    decoder = compiled.get_base_model().model
    assert decoder._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in compiled.state_dict())  # checkpoints keep their names
    a_logps, a_grads = logps_and_grads(eager, batch, packing=True)
    counters.clear()
    b_logps, b_grads = logps_and_grads(compiled, batch, packing=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the decoder
    torch.testing.assert_close(b_logps, a_logps, atol=1e-5, rtol=1e-6)
    for name in a_grads:
        torch.testing.assert_close(b_grads[name], a_grads[name], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_a_compiled_policy_generates_eagerly(tiny_model_dir):
    """generate's one-token steps at ever new lengths would recompile the decoder again and again (a run's
    held-out generation went from 33 s to 546 s): generation runs eager, the training forward compiled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_accel.evaluation.generation import generate_answers

    torch._dynamo.reset()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    compiled = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    speed.compile_decoder(compiled, "eager")
    prompts = ["What is 2 + 2?", "Name a colour."]
    counters.clear()
    assert generate_answers(compiled, tokenizer, prompts, 6) == generate_answers(eager, tokenizer, prompts, 6)
    assert counters["stats"]["unique_graphs"] == 0  # nothing captured while generating
    compiled(input_ids=torch.tensor([[1, 5, 7]]))
    assert counters["stats"]["unique_graphs"] >= 1  # while the plain forward is compiled
    torch._dynamo.reset()


def test_torch_compile_refusals(monkeypatch):
    recipe = load_recipe(None, ["train.torch_compile=true"])
    monkeypatch.setattr(speed, "_cpp_compiler", lambda: None)
    with pytest.raises(RecipeError, match="needs a C\\+\\+ compiler"):
        speed.check_speed_options(recipe, cuda=False)
    speed.check_speed_options(recipe, cuda=True)  # CUDA inductor builds Triton kernels, no C++ needed
    speed.check_speed_options(load_recipe(None, ["train.torch_compile=true", "train.torch_compile_backend=eager"]),
                              cuda=False)
    with pytest.raises(RecipeError, match="is not a torch.compile backend"):
        speed.check_speed_options(load_recipe(None, ["train.torch_compile=true",
                                                     "train.torch_compile_backend=inductr"]), cuda=False)
    with pytest.raises(RecipeError, match="train.torch_compile is false"):
        speed.check_speed_options(load_recipe(None, ["train.torch_compile_backend=eager"]), cuda=False)


# ------------------------------------------------------------------------------------------ QLoRA

def test_qlora_is_refused_clearly_without_cuda_or_lora(capsys):
    with pytest.raises(RecipeError, match="lora.use_peft: true"):
        speed.check_speed_options(load_recipe(None, ["model.load_in_4bit=true"]), cuda=True)
    qlora = load_recipe(None, ["model.load_in_4bit=true", "lora.use_peft=true"])
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        speed.check_speed_options(qlora, cuda=False)
    if not torch.cuda.is_available():  # the command line stops with one line, before any compute
        assert train.main(["--set", "model.load_in_4bit=true", "--set", "lora.use_peft=true"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "model.load_in_4bit" in err and "CUDA" in err
    cfg = speed.bnb_4bit_config(qlora.model)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


# --------------------------------------------------------------------------------- micro-batch search

def test_micro_batch_search_walks_divisors_and_retries_only_out_of_memory():
    assert speed.micro_batch_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert speed.micro_batch_candidates(1) == [1]
    tried = []

    def fits_three(micro):
        tried.append(micro)
        if micro > 3:
            raise RuntimeError(OOM)

    assert speed.find_micro_batch(fits_three, 12) == 3
    assert tried == [12, 6, 4, 3]

    def broken(micro):
        raise RuntimeError("shape mismatch")  # not memory: must not be retried with a smaller batch

    with pytest.raises(RuntimeError, match="shape mismatch"):
        speed.find_micro_batch(broken, 8)

    def never_fits(micro):
        raise RuntimeError(OOM)

    with pytest.raises(RecipeError, match="even a micro-batch of 1 pair"):
        speed.find_micro_batch(never_fits, 4)


# ------------------------------------------------------------------------------------- the real loop

LOOP = {"lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
        "train.max_steps": 2, "data.max_train_samples": 8, "eval.do_eval": False, "train.export_merged": False}


def run_loop(model_dir: str, out: str, **extra) -> list[dict]:
    reset_accelerate()
    train.run(load_recipe(None, tiny_overrides(model_dir, out, **{**LOOP, **extra})))
    reset_accelerate()
    return read_metrics(out)


def assert_same_run(a_dir: str, b_dir: str, a_rows: list[dict], b_rows: list[dict]) -> None:
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows] == [1, 2]
    for a, b in paired_steps(a_rows, b_rows):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    a_w, b_w = adapter_weights(a_dir), adapter_weights(b_dir)
    assert a_w.keys() == b_w.keys()
    for name in a_w:
        torch.testing.assert_close(b_w[name], a_w[name], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plain") / "run")
    return out, run_loop(tiny_model_dir, out)


def test_prefix_sharing_is_the_default_and_trains_like_stacked_rows(tiny_model_dir, plain_run, tmp_path, capsys):
    """The plain run shares each pair's prompt (auto: on for a Llama with sdpa); with prefix sharing off the
    loop runs stacked [2B, T] rows on more tokens and gives the same metrics and weights."""
    out = str(tmp_path / "stacked")
    rows = run_loop(tiny_model_dir, out, **{"train.prefix_sharing": False})
    assert "chosen and rejected rows stacked" in capsys.readouterr().out
    assert_same_run(plain_run[0], out, plain_run[1], rows)
    for shared, stacked in zip(plain_run[1], rows):
        assert shared["tokens_per_second"] > 0
        # tokens the decoder ran per real token: the shared prompts run once, stacked rows also pad
        assert shared["processed_tokens_per_second"] / shared["tokens_per_second"] < 0.9
        assert stacked["processed_tokens_per_second"] / stacked["tokens_per_second"] >= 1.0


def test_the_run_keeps_its_fitted_layout_cost_for_a_resume(plain_run):
    """Packed pairs and padded rows are both exact for the tiny Llama, so the run timed them and chose per
    batch; the fitted cost is in the run folder, where a --resume reads it back (tests/test_resume.py)."""
    with open(os.path.join(plain_run[0], "layout_cost.json")) as f:
        cost = json.load(f)
    assert cost["candidates"] == ["packed_shared", "shared"] and cost["per_call"] >= 0 and cost["per_token"] >= 0


def test_packing_checkpointing_and_auto_batch_in_the_real_loop(tiny_model_dir, plain_run, tmp_path, monkeypatch,
                                                               capsys):
    """padding_free + gradient_checkpointing + auto_find_batch_size (on a machine where more than 2 pairs
    per forward run out of memory) train exactly like the plain 4-pair run: same pairs per optimizer
    step (2 x 2 accumulation), same per-step metrics, same weights."""
    forward = PreferenceLogpsModel.forward
    seen = []

    def small_memory(self, **batch):
        seen.append(batch["chosen_input_ids"].shape[0])
        if batch["chosen_input_ids"].shape[0] > 2:
            raise RuntimeError(OOM)
        return forward(self, **batch)

    monkeypatch.setattr(PreferenceLogpsModel, "forward", small_memory)
    out = str(tmp_path / "fast")
    rows = run_loop(tiny_model_dir, out, **{"train.padding_free": True, "model.gradient_checkpointing": True,
                                            "train.auto_find_batch_size": True})
    assert "micro-batch 2 pairs x 2 accumulation steps = 4 pairs" in capsys.readouterr().out
    assert seen[:2] == [4, 2] and set(seen[2:]) == {2}  # 4 refused once, then only 2-pair forwards
    assert_same_run(plain_run[0], out, plain_run[1], rows)
    with open(os.path.join(out, "recipe.yaml")) as f:
        saved = yaml.safe_load(f)["train"]
    assert saved["auto_find_batch_size"] is True
    # The search ran before recipe.yaml was written: the saved recipe (and every checkpoint's) says what ran.
    assert (saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]) == (2, 2)


# ------------------------------------------------------------------------------------- benchmark

def test_benchmark_quick_smoke(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_dpo_step as bench

    monkeypatch.setitem(__import__("sys").modules, "trl", None)  # the TRL row must skip cleanly without trl
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--no-subprocess", "--steps", "1", "--warmup", "1", "--pairs", "16",
                       "--configs", "naive,default,leanest,fastest_bf16_pre,packed,unshared,trl", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"naive", "default", "leanest", "fastest_bf16_pre", "packed", "unshared"}
    for name, r in rows.items():
        assert r["real_tps"] > 0 and 0 < r["mfu"] < 1
        shared = name in ("default", "leanest", "fastest_bf16_pre")  # prefix sharing (on by default): each
        raw = result["raw"][name]  # pair's common prefix runs once, so the decoder sees fewer tokens than real
        assert (sum(raw["unique"]) < sum(raw["real"])) == shared
        assert (r["processed_tps"] < r["real_tps"]) == shared
    assert rows["packed"]["pad_ratio"] == pytest.approx(1.0)  # packed: no padding processed
    assert rows["fastest_bf16_pre"]["precomputed"] and rows["fastest_bf16_pre"]["prepass_s"] > 0
    assert "fastest_bf16_pre: reference pre-pass" in text
    assert "trl is not importable" in result["raw"]["trl"]["skipped"]
    check = result["raw"]["check"]
    for path in ("default", "leanest", "stacked", "packed"):
        assert check[path]["logps_rel"] <= 1e-5 and check[path]["loss_abs"] <= 1e-5, check
    assert "| naive: 2 forwards" in text and "[ok] default vs naive" in text

    # The subprocess worker's entry point (what each row runs in its own process), here in-process.
    setup = bench.Setup(model_path=bench.tiny_model_dir(str(tmp_path / "tiny")), conversational=False, pairs=8,
                        max_length=128, max_prompt_length=64, steps=1, warmup=0, prompt_words=(2.0, 0.6, 2, 12),
                        answer_words=(2.2, 0.8, 2, 30), quick=True)
    worker_out = tmp_path / "worker.json"
    assert bench.main(["--worker", "default", "--setup", json.dumps(bench.dataclasses.asdict(setup)),
                       "--out", str(worker_out)]) == 0
    worker = json.loads(worker_out.read_text())
    assert len(worker["times"]) == 1 and worker["peak"] > 0 and worker["real"][0] > 0


def test_benchmark_repeats_and_length_sweep(tmp_path, monkeypatch, capsys):
    """--repeats gives median rows with their spread; --sweep the scaling table and the growth lines."""
    from benchmarks import bench_dpo_step as bench

    monkeypatch.setitem(__import__("sys").modules, "trl", None)
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--no-subprocess", "--steps", "1", "--warmup", "1", "--pairs", "12", "--no-check",
                       "--configs", "default", "--repeats", "2", "--sweep", "256,512", "--sweep-configs",
                       "default,leanest,trl", "--sweep-steps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["repeats"] == 2 and len(result["repeats"]["default"]) == 2 and row["tps_spread"] >= 0
    times = [bench.summarise("default", r, result["roof"], 1)["real_tps"] for r in result["repeats"]["default"]]
    assert row["real_tps"] == pytest.approx(sum(times) / 2)  # the median of two
    assert [p["tokens"] for p in result["sweep"]] == [256, 512]
    short, long = ({r["name"]: r for r in p["rows"]} for p in result["sweep"])
    assert set(short) == {"default", "leanest"} and long["default"]["real_per_step"] > 1.5 * short["default"]["real_per_step"]
    assert "| 256 (" in text and "growth default: 256 -> 512 tokens per pair" in text
    assert "512 tokens/pair: trl: trl is not importable" in text


# ---------------------------------------------------------------------------------- model.dtype auto

def test_auto_dtype_rules():
    assert speed.bf16_matrix_units(False, {"fpu", "amx_bf16", "avx512_bf16"}) == "AMX-BF16"
    assert speed.bf16_matrix_units(False, {"fpu", "avx512_bf16"}) == "AVX512-BF16"
    assert speed.bf16_matrix_units(False, {"fpu", "avx2", "avx512f"}) is None  # bf16 would be emulated
    assert speed.auto_dtype(True, "AMX-BF16")[0] == "bfloat16"
    assert speed.auto_dtype(True, None) == ("float32", "no bf16 matrix units on this device")
    assert speed.auto_dtype(False, "AMX-BF16")[0] == "float32"  # full fine-tuning: float32 master weights

    def adapter_only(*sets):
        return speed.adapter_only(load_recipe(None, list(sets)))

    assert adapter_only("lora.use_peft=true")
    assert not adapter_only()
    assert not adapter_only("lora.use_peft=true", "lora.lora_modules_to_save=[lm_head]")  # trains in full
    assert not adapter_only("lora.use_peft=true", "loss.loss_type=bradley_terry")  # a new score head


def test_auto_dtype_loads_a_bf16_base_and_keeps_the_adapter_float32(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """With bf16 units (stated here, whatever this CPU has) a LoRA run loads its base in bfloat16, its adapter
    and optimizer state stay float32, and recipe.yaml says what ran; without units, or for full fine-tuning,
    auto is float32. A resume keeps the checkpoint's dtype."""
    import transformers

    seen = {"loaded": []}
    real_step, real_load = torch.optim.AdamW.step, transformers.AutoModelForCausalLM.from_pretrained

    def step(self, *args, **kwargs):
        seen["state"] = {v.dtype for st in self.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()}
        seen["params"] = {p.dtype for g in self.param_groups for p in g["params"]}
        return real_step(self, *args, **kwargs)

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen["loaded"].append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(speed, "bf16_matrix_units", lambda gpu, flags=None: "AMX-BF16")
    out = str(tmp_path / "lora")
    run_loop(tiny_model_dir, out, **{"model.dtype": "auto", "train.save_steps": 1})
    assert "model.dtype auto -> bfloat16 (frozen base weights in bf16 on AMX-BF16" in capsys.readouterr().out
    assert yaml.safe_load(open(os.path.join(out, "recipe.yaml")))["model"]["dtype"] == "bfloat16"
    assert seen["loaded"] == [{torch.bfloat16}]  # the base (and adapter-off reference) in bf16
    assert seen["params"] == {torch.float32} and seen["state"] == {torch.float32}  # the adapter only
    weights = adapter_weights(out)
    assert {w.dtype for w in weights.values()} == {torch.float32}

    monkeypatch.setattr(speed, "bf16_matrix_units", lambda gpu, flags=None: None)  # resume elsewhere
    reset_accelerate()
    plan = preflight(load_recipe(None, tiny_overrides(tiny_model_dir, out, **{**LOOP, "model.dtype": "auto",
                                                                             "train.max_steps": 3})), resume=True)
    assert plan.recipe.model.dtype == "bfloat16"  # the checkpoint's, not this device's
    run_loop(tiny_model_dir, str(tmp_path / "no_units"), **{"model.dtype": "auto"})
    assert "model.dtype auto -> float32 (no bf16 matrix units" in capsys.readouterr().out
    run_loop(tiny_model_dir, str(tmp_path / "full"), **{"model.dtype": "auto", "lora.use_peft": False})
    assert "model.dtype auto -> float32 (weights that train in full" in capsys.readouterr().out


def test_generation_benchmark_smoke(tiny_model_dir, tmp_path):
    """The sampling benchmark runs both rows on the same prompts and counts the tokens each generated."""
    from benchmarks import bench_generation

    summary = bench_generation.main(["--model", tiny_model_dir, "--repeats", "1", "--prompts", "3", "--samples", "2",
                                     "--max-new-tokens", "5", "--output-dir", str(tmp_path / "run"),
                                     "--json", str(tmp_path / "gen.json")])
    for row in ("dpo_accel", "plain"):
        assert 3 <= summary[row]["tokens_per_call"] <= 3 * 2 * 5 and summary[row]["tokens_per_second"] > 0
    assert summary["setup"]["prompts"] == 3 and summary["ratio"] > 0
    assert json.load(open(tmp_path / "gen.json"))["setup"]["samples"] == 2


def test_memory_benchmark_smoke(tiny_model_dir, tmp_path):
    """Both allocator settings run in their own process and count what autograd saved, which grows with
    the pair's length."""
    from benchmarks import bench_memory

    results = bench_memory.main(["--model", tiny_model_dir, "--lengths", "64,256", "--json", str(tmp_path / "m.json")])
    assert set(results) == {"glibc", "returned"}
    for rows in results.values():
        assert [r["tokens"] for r in rows] == [64, 256] and 0 < rows[0]["saved_mib"] < rows[1]["saved_mib"]
    assert json.load(open(tmp_path / "m.json")).keys() == results.keys()
