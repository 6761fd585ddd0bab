"""Prefix sharing with the pairs packed into one row (logps ``pack_pairs``, dpo_accel/attention.py): exact
against separate forwards (float64), sliding windows kept, no mask over the whole row, the CUDA block mask's
definition checked on CPU, the self-check choosing the layout, and the layout chosen per batch by a cost
fitted at start-up (packed pairs save padding, a padded row per pair saves attention calls)."""
from __future__ import annotations

import pytest
import torch

from conftest import (ATOL, VOCAB, assert_grads_within, grads_of, lora_model, separate_reference, shared_prompt_batch,
                      tiny_llama)
from dpo_accel.model.attention import PAIR_ATTENTION, PairSegments
from dpo_accel.model.logps import (LayoutCost, PreferenceLogpsModel, _pair_packed_inputs, attention_calls,
                                   calibrate_layout_cost, concatenated_inputs, concatenated_logps, decision_line,
                                   processed_tokens, settle_logps_path)


def assert_equal_to_separate(model, batch, atol, grad_rtol, **opts):
    reference = separate_reference(model, batch)
    g_reference = grads_of(model, reference)
    packed = concatenated_logps(model, batch, chunk_size=5, prefix_sharing=True, pack_pairs=True, **opts)
    g_packed = grads_of(model, packed)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(packed[key], reference[key], atol=atol, rtol=0)
    assert_grads_within(g_packed, g_reference, grad_rtol)


@pytest.mark.parametrize("naive, kind", [(False, "full"), (True, "full"), (False, "lora")])
def test_packed_pairs_equal_separate_forwards_in_values_and_gradients(naive, kind):
    """float64: log-probs to 1e-10 (gradients 1e-6: RMSNorm runs in float32 even in a float64 model);
    float32: the usual 1e-5."""
    for dtype, atol, grad_rtol in ((torch.float64, 1e-10, 1e-6), (torch.float32, ATOL, ATOL)):
        model = (lora_model() if kind == "lora" else tiny_llama()).to(dtype)
        assert_equal_to_separate(model, shared_prompt_batch(), atol, grad_rtol, naive=naive)
        assert model.config._attn_implementation == PAIR_ATTENTION


def windowed_models():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(sliding_window=3, attn_implementation="sdpa", **common))
    qwen = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                        layer_types=["full_attention", "sliding_attention"],
                                        attn_implementation="sdpa", **common))
    return {"mistral (one window)": mistral, "qwen2 (full + sliding layers)": qwen}


@pytest.mark.parametrize("name", ["mistral (one window)", "qwen2 (full + sliding layers)"])
def test_packed_pairs_keep_each_rows_sliding_window(name):
    model = windowed_models()[name].double()
    assert_equal_to_separate(model, shared_prompt_batch(), 1e-10, 1e-6)


def test_no_mask_over_the_row_only_each_pairs_small_one(monkeypatch):
    """SDPA sees at most one pair's [r - s, r] mask (the chosen blocks none at all), never [.., L, L] over
    the packed row, and transformers hands the attention no mask."""
    import dpo_accel.model.attention as attention

    model = tiny_llama()
    batch = shared_prompt_batch()
    masks, row_masks = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    original = attention.pair_attention

    def spy(module, q, k, v, attention_mask, **kw):
        row_masks.append(attention_mask)
        return original(module, q, k, v, attention_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    assert attention.use_pair_attention(model.config)  # switched (and registered) before the spy replaces it
    from transformers import AttentionInterface

    AttentionInterface.register(PAIR_ATTENTION, spy)
    try:
        with torch.no_grad():
            concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
    finally:
        attention.register()
    ids, mask, _, n = concatenated_inputs(batch)
    segments = _pair_packed_inputs(ids, mask, n, model.config)[0]["pair_segments"]
    largest = max((r - s) * r for s, r in zip(segments.shared, segments.rejected))
    assert row_masks and all(m is None for m in row_masks)
    assert masks.count(None) == model.config.num_hidden_layers * n  # every chosen block: is_causal, no mask
    assert all(m[-1] * m[-2] <= largest for m in masks if m is not None)
    assert processed_tokens(batch, "packed_shared") == segments.total < processed_tokens(batch, "shared")


@pytest.mark.parametrize("window", [None, 3])
def test_flex_block_mask_definition_equals_separate_forwards(window):
    """The CUDA path's mask_mod, materialised on CPU and given to plain SDPA over the packed row, gives the
    separate forwards' log-probs (FlexAttention itself has no CPU backward; the mask is what it would skip by)."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             sliding_window=window, attn_implementation="sdpa")).double().eval()
    batch = shared_prompt_batch()
    ids, mask, _, n = concatenated_inputs(batch)
    kwargs = _pair_packed_inputs(ids, mask, n, model.config)[0]
    segments: PairSegments = kwargs["pair_segments"]
    dense = create_mask(segments.mask_mod(window, "cpu"), 1, 1, segments.total, segments.total, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=kwargs["input_ids"], position_ids=kwargs["position_ids"], attention_mask=dense).logits[0]
        reference = separate_reference(model, batch)
    logp = torch.log_softmax(logits, -1)
    for b, o in enumerate(segments.offsets):
        c, s, r = segments.chosen[b], segments.shared[b], segments.rejected[b]
        rows = {"chosen": list(range(o, o + c)), "rejected": list(range(o, o + s)) + list(range(o + c, o + c + r - s))}
        for side, cols in rows.items():
            labels = batch[f"{side}_labels"][b, 1:len(cols)]
            keep = labels != -100
            token = logp[cols[:-1]].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close((token * keep).sum(), reference[f"{side}_logps"][b], atol=1e-10, rtol=0)


def test_self_check_picks_packed_pairs_on_sdpa_and_padded_rows_on_eager():
    batch = shared_prompt_batch()
    module = PreferenceLogpsModel(tiny_llama(), prefix_sharing=None)
    line = settle_logps_path(module, batch)
    assert module.layout == "packed_shared" and "pairs packed into one row (SDPA per pair" in line
    eager = PreferenceLogpsModel(tiny_llama(attn="eager"), prefix_sharing=None)
    line = settle_logps_path(eager, batch)
    assert eager.layout == "shared" and "one padded row per pair" in line
    off = PreferenceLogpsModel(tiny_llama(), prefix_sharing=None, pack_pairs=False)
    settle_logps_path(off, batch)
    assert off.layout == "shared"
    with pytest.raises(ValueError, match="pack_pairs: true runs on SDPA"):
        settle_logps_path(PreferenceLogpsModel(tiny_llama(attn="eager"), prefix_sharing=None, pack_pairs=True), batch)
    assert decision_line(module.decision, module.model).count("|") == 1


def test_a_switched_model_still_runs_plain_sdpa_outside_the_layout():
    """``sdpa_pairs`` without the keyword is SDPA with SDPA's masks: padded batches and generation unchanged."""
    model = tiny_llama().eval()
    batch = shared_prompt_batch()
    ids, mask = batch["rejected_input_ids"], batch["rejected_attention_mask"]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        concatenated_logps(model, batch, prefix_sharing=True, pack_pairs=True)
        assert model.config._attn_implementation == PAIR_ATTENTION
        after = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(after[mask.bool()], before[mask.bool()], atol=0, rtol=0)
    assert generated.shape == (1, 7)


# ------------------------------------------------------------------------------ layout chosen per batch

def uniform_pairs(pairs: int, prompt: int, answer: int, long_pair: int = 0) -> dict:
    """`pairs` pairs sharing a `prompt`-token prompt with `answer`-token answers; the last pair's answers
    `long_pair` tokens longer (so padded rows pay for it)."""
    g = torch.Generator().manual_seed(pairs + prompt + answer + long_pair)
    width = prompt + answer + long_pair
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.zeros(pairs, width, dtype=torch.long)
        mask = torch.zeros(pairs, width, dtype=torch.long)
        for b in range(pairs):
            n = prompt + answer + (long_pair if b == pairs - 1 else 0)
            ids[b, :prompt] = torch.arange(3, 3 + prompt)
            ids[b, prompt:n] = torch.randint(3, VOCAB, (n - prompt,), generator=g)
            mask[b, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt] = -100
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def test_the_cost_model_puts_many_short_pairs_in_padded_rows_and_uneven_ones_packed():
    cost = LayoutCost(per_call=1e-3, per_token=1e-5, candidates=("packed_shared", "shared"))
    short = uniform_pairs(8, prompt=40, answer=10)  # equal lengths: padding costs nothing, 16 calls do
    assert attention_calls(short, "packed_shared") == 16 and attention_calls(short, "shared") == 1
    assert processed_tokens(short, "packed_shared") == processed_tokens(short, "shared")
    assert cost.choose(short) == "shared"
    uneven = uniform_pairs(8, prompt=40, answer=10, long_pair=400)  # one long pair pads the other seven
    assert cost.seconds(uneven, "packed_shared") < cost.seconds(uneven, "shared")
    assert cost.choose(uneven) == "packed_shared"
    assert attention_calls(uneven, "packed_shared", flex=True) == 1  # one block-mask call on CUDA


def test_calibration_recovers_the_cost_per_call_and_per_token(monkeypatch):
    """Timings made of a known cost (plus a term every layout shares, which grows with the batch) give back
    the known coefficients; a single pair cannot tell them apart."""
    from dpo_accel.model import logps

    def timed(model, batch, layout, repeats, **opts):
        shared_work = 0.01 * batch["chosen_input_ids"].shape[0]  # the LM head on the same labels
        return shared_work + 2e-3 * attention_calls(batch, layout) + 3e-5 * processed_tokens(batch, layout)

    monkeypatch.setattr(logps, "_forward_seconds", timed)
    batch = uniform_pairs(8, prompt=30, answer=6, long_pair=50)
    cost = calibrate_layout_cost(None, batch, ("packed_shared", "shared"))
    assert cost.per_call == pytest.approx(2e-3, rel=1e-9) and cost.per_token == pytest.approx(3e-5, rel=1e-9)
    assert calibrate_layout_cost(None, uniform_pairs(1, 30, 6), ("packed_shared", "shared")) is None


def test_each_batch_runs_exactly_in_the_layout_its_cost_picks(monkeypatch):
    """With a cost that sends short batches to padded rows and uneven ones to packed pairs, the module runs
    each batch in its pick and both equal separate forwards (float64)."""
    from dpo_accel.model import logps

    module = PreferenceLogpsModel(lora_model().to(torch.float64), prefix_sharing=None, chunk_size=5)
    line = settle_logps_path(module, shared_prompt_batch())
    assert module.decision.padded_exact and module.decision.cost is not None, line
    assert "or one padded row per pair (4D mask), chosen per batch by measured cost" in line
    module.decision.cost = LayoutCost(1e-3, 1e-5, ("packed_shared", "shared"))
    seen = []
    real = logps.concatenated_logps
    monkeypatch.setattr(logps, "concatenated_logps", lambda *a, **k: seen.append(k["pack_pairs"]) or real(*a, **k))
    for batch, packed in ((uniform_pairs(4, prompt=6, answer=3), False),
                          (uniform_pairs(4, prompt=6, answer=3, long_pair=300), True)):
        assert module.layout_of(batch) == ("packed_shared" if packed else "shared")
        got = module(**batch)
        reference = separate_reference(module.model, batch)
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(got[key], reference[key], atol=1e-10, rtol=0)
        assert seen[-1] is packed
