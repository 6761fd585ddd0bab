"""Any decoder-only causal LM trains exactly: tiny random models of many transformers families, each with
LoRA on, against separate unpadded forwards of every sequence.

Every family is built from its own config (hidden 64, 2 layers, vocab 320, dropout 0, float32), wrapped
with a LoRA adapter whose B matrices are random (so the adapter changes the outputs), and given pairs that
share a prompt, answers of unequal length and right padding; sliding windows (4 tokens) are shorter than
every sequence. The reference is each sequence run alone, unpadded, through the model's own forward.
The families table of docs/internals.md comes from these checks: ``python scripts/families_table.py``.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import types

import pytest
import torch

from dpo_accel.model.logps import PreferenceLogpsModel, concatenated_forward, relative_difference, settle_logps_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
EOS = 2
WINDOW = 4  # sliding window of the windowed families: shorter than every prompt and answer below
RTOL = 1e-5  # float32, relative
TABLE_PAGE = os.path.join(REPO, "docs", "internals.md")  # where the families table is shown

# name: (model_type, config fields beyond the shared tiny shape, attention implementation)
FAMILIES = {
    "Llama": ("llama", {}, "sdpa"),
    "Mistral (window 4)": ("mistral", {"sliding_window": WINDOW}, "sdpa"),
    "Qwen2 (window 4 on layer 2)": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
                                             "max_window_layers": 1}, "sdpa"),
    "Qwen3": ("qwen3", {}, "sdpa"),
    "Phi-3 (window 4)": ("phi3", {"sliding_window": WINDOW}, "sdpa"),
    "Gemma": ("gemma", {}, "sdpa"),
    "Gemma 2 (window 4, soft-capping)": ("gemma2", {"sliding_window": WINDOW, "final_logit_softcapping": 5.0,
                                                   "attn_logit_softcapping": 20.0}, "eager"),
    "Gemma 3 (window 4)": ("gemma3_text", {"sliding_window": WINDOW, "sliding_window_pattern": 2,
                                           "final_logit_softcapping": 5.0}, "sdpa"),
    "StarCoder2 (window 4)": ("starcoder2", {"sliding_window": WINDOW}, "sdpa"),
    "OLMo": ("olmo", {}, "sdpa"),
    "OLMo2": ("olmo2", {}, "sdpa"),
    "Granite (logits scaling)": ("granite", {"logits_scaling": 4.0}, "sdpa"),
    "Cohere (logit scale)": ("cohere", {"logit_scale": 0.5}, "sdpa"),
    "GPT-NeoX (partial rotary)": ("gpt_neox", {"rotary_pct": 0.25}, "sdpa"),
    "Phi (partial rotary, head bias)": ("phi", {"partial_rotary_factor": 0.5}, "sdpa"),
    "GPT-2 (learned positions)": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "sdpa"),
    "GPT-BigCode": ("gpt_bigcode", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "sdpa"),
    "OPT (learned positions)": ("opt", {"ffn_dim": 96, "word_embed_proj_dim": 64}, "sdpa"),
    "GPT-J (head bias)": ("gptj", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128},
                          "eager"),
    "Falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "head_dim": None}, "sdpa"),
    "Bloom (ALiBi)": ("bloom", {"n_layer": 2, "n_head": 4}, "eager"),
    "Mixtral (MoE)": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "sdpa"),
    "Qwen2-MoE (MoE)": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                      "shared_expert_intermediate_size": 32}, "sdpa"),
    "Qwen3-MoE (MoE)": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                        "sdpa"),
    "OLMoE (MoE)": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}, "sdpa"),
}
MOE = ("Mixtral (MoE)", "Qwen2-MoE (MoE)", "Qwen3-MoE (MoE)", "OLMoE (MoE)")


def build(name: str, lora: bool = True, seed: int = 0) -> torch.nn.Module:
    """The family's tiny causal LM (float32, dropout 0), with a LoRA adapter on all linear layers whose
    up-projections are random (peft's init_lora_weights=False) so the adapter is not a no-op."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_accel.model.loading import disable_dropout

    model_type, extra, attn = FAMILIES[name]
    shape = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=96, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                 eos_token_id=EOS, tie_word_embeddings=False)
    fields = {k: v for k, v in {**shape, **extra}.items() if v is not None}  # None: a field the family derives
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    disable_dropout(model)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so a wrong context shows in the log-probs
        model.get_output_embeddings().weight.normal_(0, 0.3)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


def family_batch(seed: int = 7) -> dict:
    """Right-padded pairs: four share a prompt (one also shares the start of its answers), one chosen
    answer is a prefix of its rejected one, one pair shares nothing; answers of unequal lengths; each
    side padded with its own pad id; the longest sequence (22 tokens) is 5 windows long."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    pairs = []
    for prompt_len, c_len, r_len, common in ((9, 5, 3, 0), (6, 4, 9, 2), (11, 2, 6, 0), (5, 7, 4, 3)):
        prompt, start = toks(prompt_len), toks(common)
        pairs.append((prompt, start + toks(c_len - common) + [EOS], start + toks(r_len - common) + [EOS]))
    prompt, answer = toks(8), toks(3)
    pairs.append((prompt, answer, answer + toks(4) + [EOS]))
    pairs.append((toks(5), toks(6) + [EOS], None))
    from benchmarks.pair_batches import padded_pairs

    rows = {"chosen": [(p, c) for p, c, _ in pairs],
            "rejected": [(p, r) if r is not None else (toks(7), toks(3) + [EOS]) for p, _, r in pairs]}
    return padded_pairs(rows, {"chosen": 0, "rejected": 5}, extra=2)


@torch.no_grad()
def separate_forwards(model, batch) -> dict:
    """Each sequence alone, unpadded, through the model's own forward -> float32 log-softmax -> the
    summed log-probs of its label tokens: the independent reference."""
    out = {}
    for side in ("chosen", "rejected"):
        sums = []
        for ids, mask, labels in zip(*(batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))):
            n = int(mask.sum())
            logits = model(input_ids=ids[None, :n]).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            target = labels[1:n]
            keep = target != -100
            sums.append(logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum())
        out[f"{side}_logps"] = torch.stack(sums)
    return out


def check_family(name: str) -> dict:
    """Every public way to get the log-probs of `family_batch` under the family's LoRA model, against the
    separate forwards. Returns the families table row's facts: path, layout, reasons, largest relative difference."""
    model = build(name)
    batch = family_batch()
    reference = separate_forwards(model.eval(), batch)
    diffs = {}
    with torch.no_grad():
        diffs["concatenated_forward"] = concatenated_forward(model, batch)
        diffs["concatenated_forward shared"] = concatenated_forward(model, batch, prefix_sharing=None)
    module = PreferenceLogpsModel(model, chunk_size=5, prefix_sharing=None)
    line = settle_logps_path(module, batch)
    model.train()
    shared = module(**batch)  # the training call: gradients on, the settled layout
    module.prefix_sharing = False
    stacked = module(**batch)
    diffs["PreferenceLogpsModel"] = shared
    diffs["PreferenceLogpsModel stacked"] = stacked
    (shared["chosen_logps"].sum() - stacked["rejected_logps"].sum()).backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    worst = 0.0
    for where, got in diffs.items():
        if isinstance(got, tuple):
            got = {"chosen_logps": got[0], "rejected_logps": got[1]}
        d = relative_difference({k: v.detach() for k, v in got.items()}, reference)
        assert d <= RTOL, f"{name}: {where} differs from separate forwards by {d:.2e} relative"
        worst = max(worst, d)
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert any(float(g.abs().max()) > 0 for g in lora_grads)
    decision = module.decision
    return {"family": name, "model_type": FAMILIES[name][0], "attention": FAMILIES[name][2],
            "path": decision.path, "path_reason": decision.path_reason, "sharing": bool(decision.sharing),
            "sharing_reason": decision.sharing_reason, "max_rel_diff": worst, "line": line}


def families_table(results: list[dict]) -> str:
    """The families table of docs/internals.md (markdown) from `check_family` results."""
    lines = [TABLE_HEADER, "| --- | --- | --- | --- | ---: |"]
    for r in results:
        why = r["sharing_reason"]
        if r["path"] != "lean":
            why = f"full logits: {r['path_reason']}; {why}"
        lines.append(f"| {r['family']} (`{r['model_type']}`, {r['attention']}) | {r['path']} | "
                     f"{'on' if r['sharing'] else 'off'} | {why} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


TABLE_HEADER = ("| family (`model_type`, attention) | log-probs path | prefix sharing | why | max relative "
                "difference vs separate forwards |")


def table_rows(text: str) -> list[list[str]]:
    """The families table's rows in ``text`` (a page), as lists of cells, header and rule excluded."""
    lines = text.splitlines()
    start = lines.index(TABLE_HEADER) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


# ------------------------------------------------------------------------------- mixture of experts

@pytest.mark.parametrize("name", ["Mixtral (MoE)", "Qwen2-MoE (MoE)"])
def test_moe_loss_adds_the_models_own_router_loss_and_the_reference_never_computes_it(name):
    """The router loss of the training forward (either layout) is the model's own ``aux_loss`` on the
    stacked, padded rows; the objective adds coef x it (config coefficient, or the recipe's); a forward
    without gradients (every reference strategy, eval) returns none; dense models never do."""
    from dpo_accel.objectives.registry import compute_objective
    from dpo_accel.config.schema import LossConfig

    model = build(name)
    batch = family_batch()
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids, mask = (torch.cat([torch.nn.functional.pad(batch[f"{s}_{k}"], (0, T - batch[f"{s}_{k}"].shape[1]))
                            for s in ("chosen", "rejected")]) for k in ("input_ids", "attention_mask"))
    model.train()
    own = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    coef = model.config.router_aux_loss_coef
    assert coef > 0
    module = PreferenceLogpsModel(model, chunk_size=5, prefix_sharing=None)
    settle_logps_path(module, batch)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for sharing in (True, False):
        module.prefix_sharing = sharing
        policy = module(**batch)
        torch.testing.assert_close(policy["aux_loss"], own, rtol=1e-5, atol=0)
        assert any(float(g.abs().max()) > 0 for g in torch.autograd.grad(policy["aux_loss"], lora, allow_unused=True)
                   if g is not None)  # the router loss trains the adapter
        with torch.no_grad():
            reference = module(**batch)  # how every reference strategy calls it
        assert "aux_loss" not in reference
        plain = compute_objective(LossConfig(router_aux_loss_coef=0.0), policy, reference)
        out = compute_objective(LossConfig(), policy, reference)
        torch.testing.assert_close(out.loss, plain.loss + coef * own.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(out.aux_loss, own.detach())
        assert out.loss.requires_grad and not out.aux_loss.requires_grad
        override = compute_objective(LossConfig(router_aux_loss_coef=0.5), policy, reference)
        torch.testing.assert_close(override.loss, plain.loss + 0.5 * own.detach(), rtol=1e-6, atol=0)
        assert compute_objective(LossConfig(), reference, reference).aux_loss is None
    dense = PreferenceLogpsModel(build("Llama"), prefix_sharing=False)(**batch)
    assert "aux_loss" not in dense and compute_objective(LossConfig(), dense, dense).aux_loss is None


# ------------------------------------------------------------------------------ a head the lean path misses

def mis_structured() -> torch.nn.Module:
    """A GPT-NeoX whose forward adds a bias to the logits outside its output embedding: the lean path
    (decoder body -> get_output_embeddings()) cannot see it; only the self-check can."""
    model = build("GPT-NeoX (partial rotary)", lora=False)
    model.logit_bias = torch.nn.Parameter(torch.randn(VOCAB))
    plain_forward = type(model).forward

    def forward(self, *args, **kwargs):
        out = plain_forward(self, *args, **kwargs)
        out.logits = out.logits + self.logit_bias
        return out
    model.forward = types.MethodType(forward, model)
    return model


def test_self_check_picks_the_full_path_for_a_head_it_cannot_see_and_lean_forced_fails_in_one_line():
    model = mis_structured()
    batch = family_batch()
    module = PreferenceLogpsModel(model, prefix_sharing=None)
    line = settle_logps_path(module, batch)
    assert module.naive and module.decision.path == "full" and module.decision.path_diff > 1e-2
    assert line.startswith("log-probs: full logits for model type 'gpt_neox' (differs from the model's own logits by")
    assert "GB per 1k tokens" in line or "MB per 1k tokens" in line
    assert "\n" not in line and "prefix sharing on" in line  # the full path shares the prefix too
    reference = separate_forwards(model.eval(), batch)
    with torch.no_grad():
        assert relative_difference(module(**batch), reference) <= RTOL
        assert relative_difference(dict(zip(("chosen_logps", "rejected_logps"), concatenated_forward(model, batch))),
                                   reference) <= RTOL
    with pytest.raises(ValueError) as err:
        settle_logps_path(PreferenceLogpsModel(model), batch, "lean")
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.logps_path: lean, but for model type 'gpt_neox'")
    assert message.endswith("set train.logps_path: auto or full")
    good = PreferenceLogpsModel(build("GPT-NeoX (partial rotary)"))
    assert settle_logps_path(good, batch, "lean").startswith("log-probs: memory-lean") and not good.naive
    from dpo_accel.config.errors import RecipeError
    from dpo_accel.config.load import load_recipe

    assert load_recipe(None, ["train.logps_path=full"]).train.logps_path == "full"
    with pytest.raises(RecipeError, match="^recipe key 'train.logps_path' is 'fast'; choose one of: auto, lean, full$"):
        load_recipe(None, ["train.logps_path=fast"])


def test_a_model_without_a_visible_head_gets_the_full_path_not_an_error():
    """The public API never refuses a causal LM: no output embedding to call means the model's own forward."""
    model = build("Llama", lora=False)
    model.get_output_embeddings = lambda: None
    batch = family_batch()
    module = PreferenceLogpsModel(model, prefix_sharing=None)
    line = settle_logps_path(module, batch)
    assert module.naive and "cannot run: get_output_embeddings() gives no LM head" in line, line
    with torch.no_grad():
        got = dict(zip(("chosen_logps", "rejected_logps"), concatenated_forward(model, batch)))
    assert relative_difference(got, separate_forwards(model.eval(), batch)) <= RTOL


def test_16_bit_weights_are_checked_in_float32_or_within_the_16_bit_tolerance(monkeypatch):
    """A bfloat16 model is self-checked with its weights held as float32 (restored bit for bit after), so
    the layouts are measured exactly, as on a float32 model. Where the float32 copy would not fit, it is
    checked in bf16: Gemma 2 rounds its own logits before soft-capping them (the lean path caps in float32),
    which differs by rounding only, inside the 16-bit tolerance, so the lean path stays."""
    from dpo_accel.model import logps

    model = build("Gemma 2 (window 4, soft-capping)", lora=False).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = PreferenceLogpsModel(model, prefix_sharing=None)
    line = settle_logps_path(module, family_batch())
    assert not module.naive and module.decision.path_diff <= 1e-4 and "within 0.0001" in line, line
    assert module.decision.sharing, line  # exact in float32; bf16 rounding would differ by ~1e-2
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    monkeypatch.setattr(logps, "free_memory_bytes", lambda device: 0)  # no room for the float32 copy
    module = PreferenceLogpsModel(model, prefix_sharing=None)
    line = settle_logps_path(module, family_batch())
    assert not module.naive and 0 < module.decision.path_diff <= 1e-2 and "within 0.01" in line, line
    lazy = PreferenceLogpsModel(build("Gemma 2 (window 4, soft-capping)", lora=False), prefix_sharing=None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a reference copy's first call, bf16 run
        lazy(**family_batch())
    assert not lazy.naive and lazy.decision.path_diff <= 1e-4  # checked in float32, outside the autocast


def test_a_family_that_takes_no_4d_mask_falls_back_to_stacked_rows_and_forcing_sharing_fails():
    batch = family_batch()
    module = PreferenceLogpsModel(build("Bloom (ALiBi)"), prefix_sharing=None)
    line = settle_logps_path(module, batch)
    assert module.layout == "concat" and "prefix sharing off: the family's forward refuses a 4D mask" in line
    assert module.layout_reason in line
    with pytest.raises(ValueError, match=r"^train.prefix_sharing: true, but for model type 'bloom'"):
        settle_logps_path(PreferenceLogpsModel(build("Bloom (ALiBi)"), prefix_sharing=True), batch)


# --------------------------------------------------------------------------- end to end, accelerate launch

def save_tiny(model_type: str, path: str, tokenizer_dir: str, **extra) -> str:
    """A tiny random model of ``model_type`` with the real SmolLM2 tokenizer, saved for model_name_or_path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def launch(recipe: str, overrides: dict, cwd: str) -> subprocess.CompletedProcess:
    """The README's command: accelerate launch --config_file cpu_single.yaml dpo_accel/train.py --recipe ... --set ..."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_single.yaml"), os.path.join(REPO, "dpo_accel", "train.py"),
           "--recipe", recipe]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def metric_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("model_type, extra", [("gpt_neox", {"rotary_pct": 0.25}),
                                               ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2})])
@pytest.mark.slow
def test_lora_run_through_accelerate_launch(model_type, extra, smol_dir, tmp_path):
    """LoRA DPO of a tiny GPT-NeoX / Mixtral with the main job's recipe: the lean path and prefix sharing
    settle at start-up, metrics are written, the merged model loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(model_type, str(tmp_path / model_type), smol_dir, **extra)
    out = str(tmp_path / "run")
    proc = launch(os.path.join(REPO, "recipes", "smollm2_arith_lora.yaml"), {
        "model.model_name_or_path": model_dir, "data.dataset_name": os.path.join(REPO, "data", "arith_prefs"),
        "data.max_train_samples": 16, "data.max_eval_samples": 8, "data.max_length": 96,
        "data.max_prompt_length": 64, "train.output_dir": out, "train.per_device_train_batch_size": 4,
        "train.max_steps": 3, "train.logging_steps": 1, "train.save_steps": 0, "train.learning_rate": 1e-3,
        "train.mixed_precision": "no", "lora.lora_r": 4, "eval.generation_prompts": 0}, str(tmp_path))
    assert "log-probs: memory-lean" in proc.stdout and "prefix sharing on: exact" in proc.stdout, proc.stdout[-2000:]
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(("aux_loss" in r) == (model_type == "mixtral") for r in rows)  # the router loss, MoE only
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    assert merged.config.model_type == model_type and not any("lora" in n for n, _ in merged.named_parameters())


def hh_dataset(path: str, n_train: int, n_test: int) -> str:
    """A small Anthropic-HH-format dataset: chosen / rejected transcripts sharing every turn but the last."""
    rng = random.Random(0)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                prompt = (f"\n\nHuman: Can you add {a} and {b}?\n\nAssistant: Sure, let me work it out."
                          f"\n\nHuman: What do you get?\n\nAssistant:")
                f.write(json.dumps({"chosen": f"{prompt} {a} + {b} = {a + b}.",
                                    "rejected": f"{prompt} I think it is {a + b + rng.randint(1, 9)}, maybe."}) + "\n")
    return path


@pytest.mark.slow
def test_dpo_paper_recipes_run_on_a_tiny_gpt_neox(smol_dir, tmp_path):
    """The paper's two recipes as shipped, only the model (a tiny GPT-NeoX, Pythia's family), the data (an
    HH-format file) and the output folders overridden: SFT, then DPO from its export, one epoch of one
    64-pair step each, RMSprop, warm-up, clipping, the 16-bit reference copy and the 256-pair eval cap."""
    from transformers import AutoModelForCausalLM

    from dpo_accel.config.load import load_recipe

    sft_recipe = os.path.join(REPO, "recipes", "dpo_paper_hh_pythia28_sft.yaml")
    dpo_recipe = os.path.join(REPO, "recipes", "dpo_paper_hh_pythia28_dpo.yaml")
    sft, dpo = load_recipe(sft_recipe), load_recipe(dpo_recipe)
    for r in (sft, dpo):
        t = r.train
        assert (t.optimizer, t.learning_rate, t.warmup_steps, t.max_grad_norm, t.num_train_epochs) == (
            "rmsprop", 5e-7, 150, 10.0, 1)
        assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 64
        assert (r.data.max_length, r.data.max_prompt_length, r.data.max_eval_samples) == (512, 256, 256)
        assert r.model.model_name_or_path.endswith("pythia-2.8b") or r is dpo
    assert dpo.loss.beta == 0.1 and dpo.loss.loss_type == "sigmoid" and sft.loss.loss_type == "sft"
    assert dpo.model.model_name_or_path == os.path.join(sft.train.output_dir, "model")
    model_dir = save_tiny("gpt_neox", str(tmp_path / "pythia"), smol_dir, rotary_pct=0.25)
    data = hh_dataset(str(tmp_path / "hh"), n_train=64, n_test=12)
    common = {"data.dataset_name": data}
    proc = launch(sft_recipe, {**common, "model.model_name_or_path": model_dir,
                               "train.output_dir": str(tmp_path / "sft")}, str(tmp_path))
    assert "log-probs: memory-lean" in proc.stdout
    proc = launch(dpo_recipe, {**common, "model.model_name_or_path": str(tmp_path / "sft" / "model"),
                               "train.output_dir": str(tmp_path / "dpo")}, str(tmp_path))
    assert "log-probs: memory-lean" in proc.stdout and "prefix sharing on" in proc.stdout
    for stage in ("sft", "dpo"):
        rows = metric_rows(str(tmp_path / stage))
        steps = [r for r in rows if "loss" in r]
        assert [r["step"] for r in steps] == [1], stage  # one epoch of 64 pairs at batch 64
        assert steps[0]["learning_rate"] < 5e-7, stage  # inside the 150 warm-up steps
        assert any("eval/loss" in r or "eval/nll" in r for r in rows), stage
        AutoModelForCausalLM.from_pretrained(str(tmp_path / stage / "model"))
    assert abs([r for r in metric_rows(str(tmp_path / "dpo")) if "loss" in r][0]["loss"] - math.log(2)) < 1e-2


_RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_equals_separate_forwards(name):
    result = check_family(name)
    _RESULTS[name] = result
    if FAMILIES[name][0] != "bloom":  # every family here takes a 4D mask and positions, except ALiBi Bloom
        assert result["path"] == "lean" and result["sharing"], result["line"]
    else:
        assert not result["sharing"] and "4D mask" in result["sharing_reason"], result["line"]


def test_families_table_is_the_checks_output():
    """The table of docs/internals.md is what scripts/families_table.py renders from these checks (families this
    session did not check yet are checked here): every cell equal, except that a measured difference may move
    within a factor of 10 (float32 rounding depends on the CPU's kernels) and must stay under 1e-5."""
    results = [_RESULTS.get(name) or check_family(name) for name in FAMILIES]
    fresh = table_rows(families_table(results))
    with open(TABLE_PAGE, encoding="utf-8") as f:
        text = f.read()
    assert TABLE_HEADER in text, "docs/internals.md lacks the families table; paste: python scripts/families_table.py"
    shown = table_rows(text)
    hint = "docs/internals.md's families table is stale; paste the output of: python scripts/families_table.py"
    assert [row[:-1] for row in shown] == [row[:-1] for row in fresh], hint
    for old, new in zip(shown, fresh):
        assert float(old[-1]) <= RTOL and (float(old[-1]) == float(new[-1]) == 0
                                           or 0.1 <= float(old[-1]) / max(float(new[-1]), 1e-30) <= 10), hint
