"""The LM head's chunks are sized by the vocabulary: the fused linear-head log-probs equal autograd's
full-logits computation in values and gradients, and the transient they allocate at a 131k vocabulary,
measured by the profiler's allocator events, stays under a quarter of one float32 [2B, T, V] logits tensor."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_accel.model.logps import _LinearHeadLogps, concatenated_logps, head_chunk_positions


def reference_logps(head: torch.nn.Linear, hidden, targets):
    logits = head(hidden)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype, bias, tol", [(torch.float64, True, 1e-12), (torch.float32, False, 1e-5)])
def test_fused_head_equals_full_logits_in_values_and_gradients(dtype, bias, tol):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias).to(dtype)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    weights = torch.randn(37, dtype=dtype)  # a per-token upstream gradient, as the loss gives
    ref = reference_logps(head, hidden, targets).to(dtype)
    g_ref = torch.autograd.grad((ref * weights).sum(), [hidden, head.weight] + ([head.bias] if bias else []))
    out = _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets)
    g_out = torch.autograd.grad((out * weights).sum(), [hidden, head.weight] + ([head.bias] if bias else []))
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=tol * float(b.abs().max()), rtol=0)


def test_fused_head_under_bf16_autocast_is_close_and_float32():
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 500, bias=False)
    hidden = torch.randn(20, 32, requires_grad=True)
    targets = torch.randint(0, 500, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _LinearHeadLogps.apply(hidden, head.weight, None, targets)
        ref = reference_logps(head, hidden, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    g_out = torch.autograd.grad(out.sum(), [hidden, head.weight])
    g_ref = torch.autograd.grad(ref.sum(), [hidden, head.weight])
    for a, b in zip(g_out, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()), rtol=0)


def test_chunk_positions_follow_the_vocabulary():
    assert head_chunk_positions(49152, 256, 64) == 170
    assert head_chunk_positions(131072, 256, 64) == 64
    assert head_chunk_positions(262144, 256, 64) == 32
    assert head_chunk_positions(320, 4, 64) == 4  # the position cap still applies
    assert head_chunk_positions(131072, 256, None) == 256


def peak_allocated(fn) -> int:
    """Peak of live CPU allocations made while `fn` runs (the profiler's allocator events, summed in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_lm_head_transient_at_131k_vocabulary_is_under_a_quarter_of_the_full_logits():
    V, B, T = 131072, 2, 256
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=V, max_position_embeddings=T, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(3, V, (B, T))
    labels = ids.clone()
    labels[:, :8] = -100  # short prompts: nearly every position is a label, as in a long answer
    mask = torch.ones_like(ids)
    batch = dict(chosen_input_ids=ids, chosen_attention_mask=mask, chosen_labels=labels,
                 rejected_input_ids=ids.flip(1), rejected_attention_mask=mask, rejected_labels=labels.flip(1))
    full_logits = 2 * B * T * V * 4  # one float32 [2B, T, V] tensor

    def step(**opts):
        def run():
            out = concatenated_logps(model, batch, **opts)
            (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
            model.zero_grad(set_to_none=True)
        return run

    lean = peak_allocated(step())  # the defaults: 256 positions at most, 64 MiB per chunk
    naive = peak_allocated(step(naive=True))
    assert naive > full_logits  # the probe sees a full logits tensor where one is built
    assert lean < full_logits / 4, f"lean peak {lean / 2**20:.0f} MiB vs full logits {full_logits / 2**20:.0f} MiB"
    assert lean < 80 * 2 ** 20  # the 64 MiB chunk budget plus the tiny model's own tensors

    # A head the fused function cannot take (a soft-cap after it) gets smaller chunks for its larger transient.
    model.config.final_logit_softcapping = 30.0
    generic = peak_allocated(step())
    model.config.final_logit_softcapping = None
    assert generic < full_logits / 4 and generic < 96 * 2 ** 20, f"generic peak {generic / 2**20:.0f} MiB"
