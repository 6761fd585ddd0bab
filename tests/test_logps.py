"""dpo_accel.model.logps: the concatenated forward and the memory-lean log-probs, against naive references.

Tiny random Llama models in float32 on CPU (dropout 0). Every "reference" here is computed in the test
from the model's full logits, one side at a time, so the library's concatenation, shifting, masking,
chunking, scattering and packing are all checked against code that does none of them.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import (ATOL, EOS, VOCAB, assert_grads_within, grads_of, lora_model, separate_reference,
                      shared_prompt_batch, tiny_llama, weighted_loss)
from dpo_accel.model.logps import PreferenceLogpsModel, concatenated_forward, concatenated_inputs, concatenated_logps


def side(B, T, seed, pad_id=0):
    """Right-padded rows of one side: [B, T] ids, mask, labels (-100 on prompt and padding, EOS last)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b in range(B):
        length = T if b == 0 else int(torch.randint(4, T + 1, (1,), generator=g))  # row 0 fills T
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        row = torch.randint(3, VOCAB, (length,), generator=g)
        row[-1] = EOS
        ids[b, :length], mask[b, :length] = row, 1
        labels[b, prompt:length] = row[prompt:]
    return ids, mask, labels


def make_batch(B=3, Tc=7, Tr=11, seed=0) -> dict:
    ci, cm, cl = side(B, Tc, seed)
    ri, rm, rl = side(B, Tr, seed + 100, pad_id=5)  # another pad id: any id must work
    return dict(chosen_input_ids=ci, chosen_attention_mask=cm, chosen_labels=cl, rejected_input_ids=ri,
                rejected_attention_mask=rm, rejected_labels=rl, idx=torch.arange(B), extra="ignored")


def naive_side(model, ids, mask, labels):
    """Reference for one side alone: full logits -> log_softmax -> shift -> gather -> masked sum.
    Returns (sum [B], count [B], wpo_mean [B])."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    adjusted = tok - torch.logsumexp(2 * logp, dim=-1)
    count = keep.sum(-1)
    return (tok * keep).sum(-1), count, (adjusted * keep).sum(-1) / count


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------- tests

def test_concatenated_inputs_pads_to_common_length():
    batch = make_batch(B=2, Tc=5, Tr=9)
    ids, mask, labels, n = concatenated_inputs(batch)
    assert n == 2 and ids.shape == mask.shape == labels.shape == (4, 9)
    assert torch.equal(ids[:2, :5], batch["chosen_input_ids"]) and torch.equal(ids[2:], batch["rejected_input_ids"])
    assert (mask[:2, 5:] == 0).all() and (labels[:2, 5:] == -100).all()


@pytest.mark.parametrize("naive", [False, True])
def test_concatenated_forward_equals_separate_forwards(naive):
    model = tiny_llama()
    batch = make_batch(B=3, Tc=7, Tr=11)
    with torch.no_grad():
        c_sum, c_n, _ = naive_side(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        r_sum, r_n, _ = naive_side(model, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])
        chosen, rejected = concatenated_forward(model, batch, naive=naive, chunk_size=4)
        c_avg, r_avg = concatenated_forward(model, batch, average_log_prob=True, naive=naive, chunk_size=4)
    assert chosen.shape == rejected.shape == (3,) and chosen.dtype == rejected.dtype == torch.float32
    torch.testing.assert_close(chosen, c_sum, atol=ATOL, rtol=0)
    torch.testing.assert_close(rejected, r_sum, atol=ATOL, rtol=0)
    torch.testing.assert_close(c_avg, c_sum / c_n, atol=ATOL, rtol=0)
    torch.testing.assert_close(r_avg, r_sum / r_n, atol=ATOL, rtol=0)
    assert not torch.allclose(c_avg, chosen)  # the counts are > 1: mean and sum really differ


@pytest.mark.parametrize("kind", ["full", "tied", "lora"])
def test_lean_equals_naive_in_values_and_gradients(kind):
    model = lora_model() if kind == "lora" else tiny_llama(tied=kind == "tied")
    if kind == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if kind == "lora":
        head = model.get_base_model().get_output_embeddings()
        assert hasattr(head, "lora_A")  # the head the lean path calls carries the adapter
    batch = make_batch(B=3, Tc=8, Tr=12, seed=1)
    naive = concatenated_logps(model, batch, naive=True)
    g_naive = grads_of(model, naive)
    lean = concatenated_logps(model, batch, chunk_size=5)  # ~30 label positions: 6 chunks, last one short
    g_lean = grads_of(model, lean)
    for key in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(lean[key], naive[key], atol=ATOL, rtol=0)
    assert_same_grads(g_lean, g_naive)
    if kind == "lora":
        assert all("lora_" in n for n in g_lean)
        assert any("lm_head" in n for n in g_lean)


@pytest.mark.parametrize("model_type, extra", [("gemma2", {"final_logit_softcapping": 0.5}),
                                               ("granite", {"logits_scaling": 7.0}),
                                               ("cohere", {"logit_scale": 0.3})])
def test_lean_applies_the_models_logit_transform(model_type, extra):
    """Soft-capping, Granite's division and Cohere's scale happen after the head: the lean path repeats them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=EOS, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)  # logits far beyond the cap / scale
    batch = make_batch(seed=12)
    with torch.no_grad():
        lean = concatenated_logps(model, batch, chunk_size=4)
        naive = concatenated_logps(model, batch, naive=True)
    torch.testing.assert_close(lean["chosen_logps"], naive["chosen_logps"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lean["rejected_logps"], naive["rejected_logps"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_equals_padded(attn):
    model = tiny_llama(attn=attn)
    batch = make_batch(B=3, Tc=9, Tr=6, seed=2)
    padded = concatenated_logps(model, batch, chunk_size=7)
    g_padded = grads_of(model, padded)
    packed = concatenated_logps(model, batch, chunk_size=7, packing=True)
    g_packed = grads_of(model, packed)
    packed_naive = concatenated_logps(model, batch, naive=True, packing=True)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(packed[key], padded[key], atol=ATOL, rtol=0)
        torch.testing.assert_close(packed_naive[key], padded[key], atol=ATOL, rtol=0)
    assert_same_grads(g_packed, g_padded)


def test_packing_without_restarting_positions_would_differ():
    """The packing test can fail: one row with plain positions lets sequences see each other."""
    model = tiny_llama().eval()
    batch = make_batch(B=2, Tc=8, Tr=8, seed=3)
    ids, mask, labels, _ = concatenated_inputs(batch)
    keep = mask.bool()
    with torch.no_grad():
        mixed = model(input_ids=ids[keep][None], attention_mask=None).logits[0]
        alone = model(input_ids=ids, attention_mask=mask).logits[keep]
    assert (mixed - alone).abs().max() > 1e-2


def test_packing_refuses_an_attention_that_ignores_position_ids():
    model = tiny_llama()
    model.config._attn_implementation = "my_custom_kernel"
    with pytest.raises(ValueError, match="packing needs an attention implementation"):
        concatenated_logps(model, make_batch(), packing=True)


@pytest.mark.parametrize("naive", [False, True])
def test_wpo_terms_equal_full_logit_computation(naive):
    model = tiny_llama()
    batch = make_batch(B=3, Tc=7, Tr=10, seed=4)
    with torch.no_grad():
        _, _, c_wpo = naive_side(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        _, _, r_wpo = naive_side(model, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])
    out = concatenated_logps(model, batch, wpo=True, naive=naive, chunk_size=4)
    torch.testing.assert_close(out["chosen_wpo_logps"], c_wpo, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["rejected_wpo_logps"], r_wpo, atol=ATOL, rtol=0)
    assert not out["chosen_wpo_logps"].requires_grad and out["chosen_logps"].requires_grad


def test_lean_head_sees_only_label_positions_in_chunks():
    model = tiny_llama()
    batch = make_batch(B=3, Tc=9, Tr=12, seed=5)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    out = concatenated_logps(model, batch, chunk_size=4)
    n_labels = int(out["chosen_tokens"].sum() + out["rejected_tokens"].sum())
    forward_calls = list(rows)
    weighted_loss(out).backward()
    hook.remove()
    assert all(len(s) == 2 and s[0] <= 4 for s in forward_calls)  # [rows, H] chunks, never [2B, T, H]
    assert sum(s[0] for s in forward_calls) == n_labels  # prompt and padding never reach the head
    assert rows[len(forward_calls):] and all(s[0] <= 4 for s in rows[len(forward_calls):])  # recomputed in backward


@pytest.mark.parametrize("naive", [False, True])
def test_no_vocab_sized_tensor_is_kept_for_backward(naive):
    """Autograd saves nothing [.., V] outside the checkpointed chunks on the lean path; the naive path
    does (the negative control shows the probe sees such tensors)."""
    model = tiny_llama()
    batch = make_batch(B=2, Tc=8, Tr=8, seed=6)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = concatenated_logps(model, batch, naive=naive, chunk_size=4)
    weighted_loss(out).backward()
    vocab_sized = [s for s in saved if s and s[-1] == VOCAB and len(s) > 1 and s != model.lm_head.weight.shape]
    assert bool(vocab_sized) == naive


def test_sft_batch_without_rejected_gives_chosen_only():
    model = tiny_llama()
    batch = make_batch(seed=7)
    sft = {k: v for k, v in batch.items() if not k.startswith("rejected_")}
    with torch.no_grad():
        full = concatenated_logps(model, batch)
        only = concatenated_logps(model, sft, wpo=True)
        chosen, rejected = concatenated_forward(model, sft)
    assert set(only) == {"chosen_logps", "chosen_tokens", "chosen_wpo_logps"}
    torch.testing.assert_close(only["chosen_logps"], full["chosen_logps"], atol=ATOL, rtol=0)
    torch.testing.assert_close(chosen, full["chosen_logps"], atol=ATOL, rtol=0)
    assert rejected is None


def test_preference_logps_model_is_one_forward_that_ignores_extra_keys():
    model = lora_model()
    wrapped = PreferenceLogpsModel(model, chunk_size=3, wpo=True)
    assert wrapped.model is model
    batch = make_batch(seed=8)
    out = wrapped(**batch)  # idx and extra are ignored
    assert {"chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "chosen_wpo_logps",
            "rejected_wpo_logps"} == set(out)
    ref = concatenated_logps(model, batch, naive=True)
    torch.testing.assert_close(out["chosen_logps"], ref["chosen_logps"], atol=ATOL, rtol=0)
    chosen, rejected = concatenated_forward(wrapped, batch)
    torch.testing.assert_close(rejected, ref["rejected_logps"], atol=ATOL, rtol=0)
    weighted_loss(out).backward()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    with pytest.raises(TypeError, match="set on the PreferenceLogpsModel"):
        concatenated_forward(wrapped, batch, chunk_size=8)


def test_adapter_off_gives_the_base_model():
    model = lora_model()
    batch = make_batch(seed=9)
    base = tiny_llama()  # same seed: the weights under the adapter
    with torch.no_grad():
        with model.disable_adapter():
            off = concatenated_logps(model, batch, chunk_size=4)
        on = concatenated_logps(model, batch, chunk_size=4)
        ref = concatenated_logps(base, batch, naive=True)
    torch.testing.assert_close(off["chosen_logps"], ref["chosen_logps"], atol=ATOL, rtol=0)
    assert (on["chosen_logps"] - ref["chosen_logps"]).abs().max() > 1e-3


def test_bf16_autocast_returns_float32_close_to_naive():
    model = tiny_llama()
    batch = make_batch(seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = concatenated_logps(model, batch, chunk_size=4)
        naive = concatenated_logps(model, batch, naive=True)
    assert lean["chosen_logps"].dtype == torch.float32
    torch.testing.assert_close(lean["chosen_logps"], naive["chosen_logps"], atol=0.5, rtol=0.02)
    weighted_loss(lean).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_batches_fail_with_one_line_and_any_causal_lm_is_served():
    model = tiny_llama()
    batch = make_batch(seed=11)
    left = dict(batch, chosen_attention_mask=batch["chosen_attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="pad on the right"):
        concatenated_logps(model, left)
    labelled_pad = dict(batch, chosen_labels=batch["chosen_labels"].clone())
    padded_rows = batch["chosen_attention_mask"][:, -1] == 0
    assert padded_rows.any()
    labelled_pad["chosen_labels"][padded_rows, -1] = 7
    with pytest.raises(ValueError, match="labels must be -100"):
        concatenated_logps(model, labelled_pad)
    torch.manual_seed(0)  # a family outside any list: the lean path is found by structure (tests/test_families.py)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():
        torch.testing.assert_close(concatenated_logps(gpt2, batch), concatenated_logps(gpt2, batch, naive=True))


@pytest.mark.parametrize("naive", [False, True])
def test_rows_without_labels_give_zero(naive):
    model = tiny_llama()
    batch = make_batch(seed=13)
    batch["chosen_labels"][1] = -100
    out = concatenated_logps(model, batch, naive=naive, wpo=True, chunk_size=4)
    assert out["chosen_logps"][1] == 0 and out["chosen_tokens"][1] == 0 and out["chosen_wpo_logps"][1] == 0
    assert (out["chosen_logps"][[0, 2]] < 0).all()
    none = {k: (torch.full_like(v, -100) if k.endswith("_labels") else v) for k, v in batch.items()}
    empty = concatenated_logps(model, none, naive=naive, chunk_size=4)
    assert (empty["chosen_logps"] == 0).all() and (empty["rejected_tokens"] == 0).all()
    weighted_loss(empty).backward()  # still a graph: a step on such a batch is a no-op, not a crash


# ----------------------------------------------------------------------------------- prefix sharing

@pytest.mark.parametrize("attn, naive, kind", [("sdpa", False, "full"), ("eager", False, "full"),
                                               ("sdpa", True, "full"), ("sdpa", False, "lora")])
def test_prefix_sharing_equals_separate_forwards_in_values_and_gradients(attn, naive, kind):
    """In float64 (log-probs to 1e-10: the same computation, regrouped) and in float32 (the usual 1e-5).
    Gradients: relative to each tensor's largest (the LM head's reach ~50); float64 to 1e-6 only, as the
    model's RMSNorm runs in float32 even in a float64 model and the shared prefix's two gradient
    contributions are summed before that cast. Eager attention runs its softmax in float32: float32 only."""
    checks = ((torch.float64, 1e-10, 1e-6), (torch.float32, ATOL, ATOL))
    for dtype, atol, grad_rtol in checks[1:] if attn == "eager" else checks:
        model = (lora_model() if kind == "lora" else tiny_llama(attn=attn)).to(dtype)
        model.config._attn_implementation = attn
        batch = shared_prompt_batch()
        reference = separate_reference(model, batch)
        g_reference = grads_of(model, reference)
        shared = concatenated_logps(model, batch, chunk_size=5, naive=naive, prefix_sharing=True)
        g_shared = grads_of(model, shared)
        assert shared["chosen_logps"].dtype == dtype
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(shared[key], reference[key], atol=atol, rtol=0)
        assert_grads_within(g_shared, g_reference, grad_rtol)
        stacked = concatenated_logps(model, batch, chunk_size=5, naive=naive)
        for key in ("chosen_tokens", "rejected_tokens"):
            torch.testing.assert_close(shared[key], stacked[key])


def test_prefix_sharing_runs_the_common_prefix_once(monkeypatch):
    """The decoder gets one row per pair of length max(c + r - s), s the longest common prefix."""
    import dpo_accel.model.logps as logps

    model = tiny_llama()
    batch = shared_prompt_batch()
    seen = []
    decoder = model.get_decoder()
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or original(**kw))
    with torch.no_grad():
        logps.concatenated_logps(model, batch, prefix_sharing=True)
    c = batch["chosen_attention_mask"].sum(-1)
    r = batch["rejected_attention_mask"].sum(-1)
    common = [0] * len(c)
    for b in range(len(c)):
        while (common[b] < min(c[b], r[b])
               and batch["chosen_input_ids"][b, common[b]] == batch["rejected_input_ids"][b, common[b]]):
            common[b] += 1
    assert common[-1] == 0 and common[1] > 2  # the batch has a pair with nothing shared and one sharing answer tokens
    assert seen == [torch.Size([len(c), int(max(c[b] + r[b] - common[b] for b in range(len(c))))])]


def test_prefix_sharing_without_the_rejected_block_would_differ():
    """The equality test can fail: a plain causal mask over [chosen | rejected rest] lets the rejected part
    see the chosen answer."""
    from dpo_accel.model.logps import _prefix_shared_inputs, concatenated_inputs

    model = tiny_llama().eval()
    batch = shared_prompt_batch()
    ids, mask, _, n = concatenated_inputs(batch)
    kwargs, _, _, L = _prefix_shared_inputs(ids, mask, n, model.config)
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(n, 1, L, L)
    with torch.no_grad():
        right = model(**kwargs).logits
        wrong = model(**{**kwargs, "attention_mask": causal}).logits
    assert (right - wrong).abs().max() > 1e-2


def test_prefix_sharing_refusals_and_no_op_cases():
    model = tiny_llama()
    batch = shared_prompt_batch()
    with pytest.raises(ValueError, match="exclusive"):
        concatenated_logps(model, batch, packing=True, prefix_sharing=True)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix sharing needs an attention implementation"):
        concatenated_logps(model, batch, prefix_sharing=True)
    model.config._attn_implementation = "sdpa"
    sft = {k: v for k, v in batch.items() if k.startswith("chosen")}  # no rejected rows: nothing to share
    with torch.no_grad():
        torch.testing.assert_close(concatenated_logps(model, sft, prefix_sharing=True)["chosen_logps"],
                                   concatenated_logps(model, sft)["chosen_logps"])


def test_prefix_sharing_keeps_each_rows_sliding_window():
    """A window shorter than the sequences: the rejected part sees the window of its own row (positions
    counted in that row), not of the shared one; without the window in the mask the result differs."""
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_accel.model.logps import _prefix_shared_inputs

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, sliding_window=3, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    batch = shared_prompt_batch()
    with torch.no_grad():
        shared = concatenated_logps(model, batch, prefix_sharing=True)
        reference = separate_reference(model, batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(shared[key], reference[key], atol=ATOL, rtol=0)
    ids, mask, _, n = concatenated_inputs(batch)
    kwargs, _, _, _ = _prefix_shared_inputs(ids, mask, n, config)
    config.sliding_window = None  # the same rows with a plain causal mask
    unwindowed, _, _, _ = _prefix_shared_inputs(ids, mask, n, config)
    assert (kwargs["attention_mask"] != unwindowed["attention_mask"]).any()
