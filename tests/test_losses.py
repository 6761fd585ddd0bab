"""Tests of dpo_accel.objectives.registry: every objective against an independent float64 implementation of its paper's
formula (plain Python `math`, element by element, no call into the code under test), hand-worked cases,
the seed signature, combinations (weighted lists, RPO, WPO, f-divergences), reference handling, the
README table, configuration errors, and a few Adam steps per objective on free log-prob parameters.
"""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpo_accel.objectives.registry import (LOSSES, compute_objective, loss_table_markdown, needs_reference,
                                           preference_loss, uses_wpo, validate_loss_config)
from dpo_accel.config.schema import LossConfig

B = 8


# ---------------------------------------------------------------------------------------------------
# Independent reference implementations (float64, Python math, one example at a time).

def lsig(x):
    """log σ(x), stable for either sign."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(lsig(x))


def examples(b):
    """Per-example dicts: sums (pw, pl, rw, rl), tokens (tw, tl), means (mw, ml, mrw, mrl), log-ratios."""
    out = []
    for i in range(len(b["pw"])):
        e = {k: float(v[i].detach()) for k, v in b.items()}
        e.update(mw=e["pw"] / e["tw"], ml=e["pl"] / e["tl"], mrw=e["rw"] / e["tw"], mrl=e["rl"] / e["tl"])
        e.update(c=e["pw"] - e["rw"], r=e["pl"] - e["rl"])
        e["h"] = e["c"] - e["r"]
        e["h_mean"] = (e["mw"] - e["mrw"]) - (e["ml"] - e["mrl"])
        out.append(e)
    return out


def paper_sigmoid(e, hp):  # DPO Eq. 7; cDPO: expected loss under labels flipped with probability ε
    z, eps = hp.beta * e["h"], hp.label_smoothing
    return (1 - eps) * -lsig(z) + eps * -lsig(-z)


def paper_ipo(e, hp):  # IPO Eq. 17 with τ = β, on per-token means (TRL / IPO authors)
    return (e["h_mean"] - 1 / (2 * hp.beta)) ** 2


def paper_hinge(e, hp):  # SLiC calibration loss with δ = 1, in units of β·h
    return max(0.0, 1 - hp.beta * e["h"])


def paper_robust(e, hp):  # rDPO: [(1-ε) L(βh) - ε L(-βh)] / (1-2ε), L(z) = -log σ(z)
    z, eps = hp.beta * e["h"], hp.label_smoothing
    return ((1 - eps) * -lsig(z) - eps * -lsig(-z)) / (1 - 2 * eps)


def paper_exo_pair(e, hp):  # EXO Eq. 16 (K=2): KL(q ‖ p), q = softmax(βc, βr), p = (1-ε, ε)
    qw = math.exp(hp.beta * e["c"]) / (math.exp(hp.beta * e["c"]) + math.exp(hp.beta * e["r"]))
    ql = 1 - qw
    eps = hp.label_smoothing
    return qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)


def paper_bco_pair(e, hp):  # BCO with reward shift δ = 0
    return -lsig(hp.beta * e["c"]) - lsig(-hp.beta * e["r"])


def paper_sppo_hard(e, hp):  # SPPO Eq. 4.7, η = 1/β, P̂ = 1 for the winner and 0 for the loser
    eta = 1 / hp.beta
    return (e["c"] - eta * (1 - 0.5)) ** 2 + (e["r"] - eta * (0 - 0.5)) ** 2


def paper_nca_pair(e, hp):  # NCA: -log σ(r_w) - ½ Σ_y log σ(-r_y)
    rw, rl = hp.beta * e["c"], hp.beta * e["r"]
    return -lsig(rw) - 0.5 * (lsig(-rw) + lsig(-rl))


def paper_apo_zero(e, hp):  # APO Eq. 7 is -σ(βc) + σ(βr); ours is shifted by +1 to be non-negative
    return -sig(hp.beta * e["c"]) + sig(hp.beta * e["r"]) + 1


def paper_apo_down(e, hp):  # APO Eq. 8 is σ(βc) - σ(β(c - r)); shifted by +1
    return sig(hp.beta * e["c"]) - sig(hp.beta * (e["c"] - e["r"])) + 1


def paper_discopop(e, hp):  # DiscoPOP (LRML) Eq. 5
    rho = hp.beta * e["h"]
    w = sig(rho / hp.discopop_tau)
    return (1 - w) * -lsig(rho) + w * math.exp(-rho)


def _aot_losses(d, hp):
    eps = hp.label_smoothing
    return [(1 - eps) * -lsig(hp.beta * x) + eps * -lsig(-hp.beta * x) for x in d]


def paper_aot(es, hp):  # AOT paired: sorted policy margins vs sorted reference margins
    pol = sorted(e["pw"] - e["pl"] for e in es)
    ref = sorted(e["rw"] - e["rl"] for e in es)
    return _aot_losses([a - b for a, b in zip(pol, ref)], hp)


def paper_aot_unpaired(es, hp):  # AOT unpaired: sorted chosen vs sorted rejected log-ratios
    cs, rs = sorted(e["c"] for e in es), sorted(e["r"] for e in es)
    return _aot_losses([a - b for a, b in zip(cs, rs)], hp)


def paper_simpo(e, hp):  # SimPO Eq. 6 (label-smoothed as in TRL's CPO trainer)
    z = hp.beta * e["pw"] / e["tw"] - hp.beta * e["pl"] / e["tl"] - hp.simpo_gamma
    return (1 - hp.label_smoothing) * -lsig(z) + hp.label_smoothing * -lsig(-z)


def paper_orpo(e, hp):  # ORPO: L_SFT + λ L_OR with odds = P/(1-P), P = exp(mean log-prob)
    pw, pl = math.exp(e["mw"]), math.exp(e["ml"])
    odds_ratio = (pw / (1 - pw)) / (pl / (1 - pl))
    return -e["mw"] - hp.orpo_lambda * math.log(sig(math.log(odds_ratio)))


def paper_sft(e, hp):  # per-token NLL of the chosen answer
    return -e["mw"]


def paper_bradley_terry(e, hp):  # reward model: -log σ(r_w - r_l - m) + η (r_w + r_l)², the rewards in pw / pl
    return -lsig(e["pw"] - e["pl"] - e["m"]) + (hp.center_rewards_coefficient or 0.0) * (e["pw"] + e["pl"]) ** 2


PER_PAIR = {"sigmoid": paper_sigmoid, "ipo": paper_ipo, "hinge": paper_hinge, "robust": paper_robust,
            "exo_pair": paper_exo_pair, "bco_pair": paper_bco_pair, "sppo_hard": paper_sppo_hard,
            "nca_pair": paper_nca_pair, "apo_zero": paper_apo_zero, "apo_down": paper_apo_down,
            "discopop": paper_discopop, "simpo": paper_simpo, "orpo": paper_orpo, "sft": paper_sft,
            "bradley_terry": paper_bradley_terry}
def paper_kto(es, hp):  # KTO Eq. 8 with z_0 from the mismatched (rejected-side) log-ratios, as TRL estimates it
    z = max(0.0, sum(e["r"] for e in es) / len(es))
    return [hp.desirable_weight * (1 - sig(hp.beta * (e["c"] - z))) if e["d"]
            else hp.undesirable_weight * (1 - sig(hp.beta * (z - e["c"]))) for e in es]


PER_BATCH = {"aot": paper_aot, "aot_unpaired": paper_aot_unpaired, "kto": paper_kto}
REFERENCE_FREE_REWARDS_ON_MEANS = {"simpo", "orpo", "sft"}
REWARDS_AS_GIVEN = {"bradley_terry"}  # a reward model's outputs are its rewards


def paper_losses(name, b, hp):
    es = examples(b)
    if name in PER_BATCH:
        return PER_BATCH[name](es, hp)
    return [PER_PAIR[name](e, hp) for e in es]


# ---------------------------------------------------------------------------------------------------
# Inputs.

def make_batch(seed=0, n=B):
    """Random per-sequence sums and token counts; per-token means in (-3, -0.05) (valid probabilities)."""
    g = torch.Generator().manual_seed(seed)
    tw = torch.randint(2, 40, (n,), generator=g).double()
    tl = torch.randint(2, 40, (n,), generator=g).double()
    pw = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05) * tw
    pl = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05) * tl
    rw = pw + torch.randn(n, generator=g, dtype=torch.float64) * 2
    rl = pl + torch.randn(n, generator=g, dtype=torch.float64) * 2
    d = (torch.arange(n) % 3 != 0).double()  # KTO's labels (read by unpaired objectives only): 2 desirable in 3
    m = torch.linspace(0.0, 2.0, n, dtype=torch.float64)  # a reward dataset's margins (read by bradley_terry only)
    return {"pw": pw, "pl": pl, "rw": rw, "rl": rl, "tw": tw, "tl": tl, "d": d, "m": m}


def dicts(b, dtype=torch.float64, requires_grad=False):
    policy = {"chosen_logps": b["pw"].to(dtype).requires_grad_(requires_grad),
              "rejected_logps": b["pl"].to(dtype).requires_grad_(requires_grad),
              "chosen_tokens": b["tw"].to(dtype), "rejected_tokens": b["tl"].to(dtype), "desirable": b["d"].bool(),
              "margin": b["m"]}
    reference = {"chosen_logps": b["rw"].to(dtype), "rejected_logps": b["rl"].to(dtype)}
    return policy, reference


def cfg_for(name, **overrides):
    """A valid LossConfig for one objective, with every hyperparameter it declares moved off its default."""
    moved = {"beta": 0.3, "label_smoothing": 0.1, "simpo_gamma": 0.7, "orpo_lambda": 0.25, "discopop_tau": 0.2,
             "desirable_weight": 1.3, "undesirable_weight": 0.7, "center_rewards_coefficient": 0.05}
    kw = {k: v for k, v in moved.items() if k in LOSSES[name].hyperparameters}
    kw.update(overrides)
    return LossConfig(loss_type=name, **kw)


def grad(t):
    """t.grad, or zeros where the loss does not read t (SFT never reads the rejected answer)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def close(actual, expected, rel=1e-6, abs_=1e-9):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rel, atol=abs_)


# ---------------------------------------------------------------------------------------------------
# Every objective against its paper.

def test_every_registered_objective_has_a_paper_implementation_here():
    assert set(PER_PAIR) | set(PER_BATCH) == set(LOSSES)


@pytest.mark.parametrize("setting", ["defaults", "moved"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_objective_equals_paper_formula(name, setting):
    cfg = cfg_for(name) if setting == "moved" else LossConfig(loss_type=name)
    if name == "exo_pair" and setting == "defaults":
        cfg = dataclasses.replace(cfg, label_smoothing=1e-3)  # EXO needs ε > 0; the paper's value
    validate_loss_config(cfg)
    b = make_batch(seed=1 if setting == "moved" else 2)
    policy, reference = dicts(b)
    out = compute_objective(cfg, policy, reference if needs_reference(cfg) else None)
    close(out.losses, paper_losses(name, b, cfg))
    close(out.loss, sum(paper_losses(name, b, cfg)) / B)
    es = examples(b)
    if name in REWARDS_AS_GIVEN:
        close(out.chosen_rewards, [e["pw"] for e in es])
        close(out.rejected_rewards, [e["pl"] for e in es])
    elif name in REFERENCE_FREE_REWARDS_ON_MEANS:
        close(out.chosen_rewards, [cfg.beta * e["mw"] for e in es])
        close(out.rejected_rewards, [cfg.beta * e["ml"] for e in es])
    else:
        close(out.chosen_rewards, [cfg.beta * e["c"] for e in es])
        close(out.rejected_rewards, [cfg.beta * e["r"] for e in es])


@pytest.mark.parametrize("name", list(LOSSES))
def test_objective_gradients_are_finite_float32(name):
    cfg = cfg_for(name)
    policy, reference = dicts(make_batch(seed=3), dtype=torch.float32, requires_grad=True)
    out = compute_objective(cfg, policy, reference)
    out.loss.backward()
    gc, gr = grad(policy["chosen_logps"]), grad(policy["rejected_logps"])
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    assert gc.abs().sum() > 0  # every objective moves the chosen answer
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (B,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert all(not v.requires_grad and v.shape == (B,) for v in out.metrics.values())


@pytest.mark.parametrize("name", list(LOSSES))
def test_objective_is_finite_on_extreme_inputs(name):
    """Margins of ±1000 nats and near-certain answers (ORPO's odds at P -> 1) stay finite in float32."""
    pw = torch.tensor([-1.0, -3000.0, 0.0, -50.0], requires_grad=True)
    pl = torch.tensor([-3000.0, -1.0, -2.0, -0.0], requires_grad=True)
    policy = {"chosen_logps": pw, "rejected_logps": pl, "chosen_tokens": torch.tensor([1.0, 30, 1, 5]),
              "rejected_tokens": torch.tensor([30.0, 1, 1, 1]), "desirable": torch.tensor([True, False, True, False])}
    reference = {"chosen_logps": torch.tensor([-1000.0, -1.0, -900.0, -1.0]),
                 "rejected_logps": torch.tensor([-1.0, -1000.0, -1.0, -900.0])}
    out = compute_objective(cfg_for(name), policy, reference)
    out.loss.backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(grad(pw)).all() and torch.isfinite(grad(pl)).all()


# ---------------------------------------------------------------------------------------------------
# Hand-worked cases.

def test_sigmoid_by_hand():
    # π_w=-10, π_l=-20, ref_w=ref_l=-12: c = 2, r = -8, h = 10; β = 0.1 -> βh = 1.
    # DPO: -log σ(1) = log(1 + e^-1) = 0.31326168751822286; rewards β·c = 0.2, β·r = -0.8.
    t = torch.tensor
    losses, cr, rr = preference_loss(t([-10.0]), t([-20.0]), t([-12.0]), t([-12.0]), 0.1)
    close(losses, [0.31326168751822286])
    close(cr, [0.2], abs_=1e-7)
    close(rr, [-0.8], abs_=1e-7)
    # The same pair twice, one with the labels swapped (h = -10): -log σ(-1) = 1 + log(1 + e^-1) = 1.3132617.
    losses, _, _ = preference_loss(t([-10.0, -20.0]), t([-20.0, -10.0]), t([-12.0, -12.0]), t([-12.0, -12.0]), 0.1)
    close(losses, [0.31326168751822286, 1.31326168751822286])


def test_conservative_dpo_by_hand():
    # ε = 0.1, βh = 1: 0.9·(-log σ(1)) + 0.1·(-log σ(-1)) = 0.9·0.3132617 + 0.1·1.3132617
    #                = 0.3132617 + 0.1 = 0.41326168751822286   (since -log σ(-x) = x - log σ(x)).
    t = torch.tensor
    losses, _, _ = preference_loss(t([-10.0]), t([-20.0]), t([-12.0]), t([-12.0]), 0.1, label_smoothing=0.1)
    close(losses, [0.41326168751822286])


def test_ipo_by_hand_seed_signature():
    # h = 10 as above. β = 0.1: 1/(2β) = 5 -> (10 - 5)² = 25.  β = 0.5: 1/(2β) = 1 -> (10 - 1)² = 81.
    t = torch.tensor
    args = (t([-10.0]), t([-20.0]), t([-12.0]), t([-12.0]))
    close(preference_loss(*args, 0.1, ipo=True)[0], [25.0])
    close(preference_loss(*args, 0.5, 0.0, True)[0], [81.0])  # positional, as the seed calls it
    close(preference_loss(*args, 0.5, loss_type="ipo")[0], [81.0])


def test_ipo_by_hand_token_average_and_summed():
    # chosen: π_w = -20 over 4 tokens (mean -5), ref_w = -24 (mean -6): c̄ = 1, c = 4.
    # rejected: π_l = -30 over 5 tokens (mean -6), ref_l = -25 (mean -5): r̄ = -1, r = -5.
    # β = 0.5 -> 1/(2β) = 1. Token-averaged: h̄ = 2 -> (2 - 1)² = 1. Summed: h = 9 -> (9 - 1)² = 64.
    # Rewards use sums either way: β·c = 2.0, β·r = -2.5.
    policy = {"chosen_logps": torch.tensor([-20.0]), "rejected_logps": torch.tensor([-30.0]),
              "chosen_tokens": torch.tensor([4.0]), "rejected_tokens": torch.tensor([5.0])}
    reference = {"chosen_logps": torch.tensor([-24.0]), "rejected_logps": torch.tensor([-25.0])}
    out = compute_objective(LossConfig(loss_type="ipo", beta=0.5), policy, reference)
    close(out.losses, [1.0])
    close(out.chosen_rewards, [2.0])
    close(out.rejected_rewards, [-2.5])
    summed = compute_objective(LossConfig(loss_type="ipo", beta=0.5, ipo_token_average=False), policy, reference)
    close(summed.losses, [64.0])


# ---------------------------------------------------------------------------------------------------
# The seed signature.

def test_seed_signature_matches_formulas():
    b = make_batch(seed=4)
    es = examples(b)
    args = (b["pw"], b["pl"], b["rw"], b["rl"])
    out = preference_loss(*args, 0.2)
    assert isinstance(out, tuple) and len(out) == 3
    close(out[0], [-lsig(0.2 * e["h"]) for e in es])
    close(out[1], [0.2 * e["c"] for e in es])
    close(out[2], [0.2 * e["r"] for e in es])
    close(preference_loss(*args, 0.2, label_smoothing=0.25)[0],
          [0.75 * -lsig(0.2 * e["h"]) + 0.25 * -lsig(-0.2 * e["h"]) for e in es])
    close(preference_loss(*args, 0.2, ipo=True)[0], [(e["h"] - 2.5) ** 2 for e in es])  # sums as given
    assert not out[1].requires_grad


def test_seed_reference_free_treats_reference_as_zero():
    b = make_batch(seed=5)
    es = examples(b)
    expected = [-lsig(0.1 * (e["pw"] - e["pl"])) for e in es]
    losses, cr, rr = preference_loss(b["pw"], b["pl"], None, None, 0.1, reference_free=True)
    close(losses, expected)
    close(cr, [0.1 * e["pw"] for e in es])
    close(rr, [0.1 * e["pl"] for e in es])
    ignored = preference_loss(b["pw"], b["pl"], b["rw"], b["rl"], 0.1, reference_free=True)[0]
    close(ignored, expected)


def test_seed_loss_type_and_hparams():
    b = make_batch(seed=6)
    es = examples(b)
    mw, ml = b["pw"] / b["tw"], b["pl"] / b["tl"]  # SimPO consumes means: the caller passes them
    losses, cr, _ = preference_loss(mw, ml, None, None, 2.0, loss_type="simpo", simpo_gamma=1.0)
    close(losses, [-lsig(2.0 * e["mw"] - 2.0 * e["ml"] - 1.0) for e in es])
    close(cr, [2.0 * e["mw"] for e in es])
    with pytest.raises(TypeError, match="did you mean 'simpo_gamma'"):
        preference_loss(mw, ml, None, None, 2.0, loss_type="simpo", simpo_gama=1.0)
    with pytest.raises(ValueError, match="compute_objective"):
        preference_loss(b["pw"], b["pl"], b["rw"], b["rl"], 0.1, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="ipo=True"):
        preference_loss(b["pw"], b["pl"], b["rw"], b["rl"], 0.1, ipo=True, loss_type="hinge")
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss(b["pw"], b["pl"], None, None, 0.1)


# ---------------------------------------------------------------------------------------------------
# Combinations.

def test_weighted_list_is_the_weighted_sum_of_its_parts():
    b = make_batch(seed=7)
    policy, reference = dicts(b)
    names, weights = ["sigmoid", "ipo", "sft"], [1.0, 0.5, 2.0]
    out = compute_objective(LossConfig(loss_type=names, loss_weights=weights), policy, reference)
    parts = [paper_losses(n, b, LossConfig(loss_type=n)) for n in names]
    expected = [sum(w * p[i] for w, p in zip(weights, parts)) for i in range(B)]
    close(out.losses, expected)
    for n, p in zip(names, parts):
        close(out.metrics[f"loss_{n}"], p)
    close(out.metrics["nll"], [-e["mw"] for e in examples(b)])
    unweighted = compute_objective(LossConfig(loss_type=names), policy, reference)
    close(unweighted.losses, [sum(p[i] for p in parts) for i in range(B)])


@pytest.mark.parametrize("name", ["sigmoid", "simpo", "aot"])
def test_rpo_adds_alpha_times_the_chosen_nll(name):
    b = make_batch(seed=8)
    policy, reference = dicts(b)
    cfg = cfg_for(name, rpo_alpha=0.7)
    out = compute_objective(cfg, policy, reference)
    nll = [-e["mw"] for e in examples(b)]
    close(out.losses, [x + 0.7 * n for x, n in zip(paper_losses(name, b, cfg), nll)])
    close(out.metrics["nll"], nll)
    assert "nll" not in compute_objective(cfg_for(name), policy, reference).metrics


def f_prime(kind, u, alpha):
    """f'(u) of each divergence as written in the f-DPO paper / TRL, constants included (they cancel)."""
    return {"reverse_kl": lambda: math.log(u) + 1,          # f(u) = u log u
            "forward_kl": lambda: -1 / u,                    # f(u) = -log u
            "js_divergence": lambda: math.log(2 * u / (1 + u)),
            "alpha_divergence": lambda: (u ** (alpha - 1) - 1) / (alpha - 1)}[kind]()


@pytest.mark.parametrize("kind,alpha", [("reverse_kl", 1.0), ("forward_kl", 1.0), ("js_divergence", 1.0),
                                        ("alpha_divergence", 0.5), ("alpha_divergence", 1.7)])
def test_f_divergence_dpo(kind, alpha):
    b = make_batch(seed=9)
    policy, reference = dicts(b)
    es = examples(b)
    cfg = LossConfig(loss_type="sigmoid", beta=0.4, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    validate_loss_config(cfg)
    h = [f_prime(kind, math.exp(e["c"]), alpha) - f_prime(kind, math.exp(e["r"]), alpha) for e in es]
    close(compute_objective(cfg, policy, reference).losses, [-lsig(0.4 * x) for x in h])
    # IPO takes f' of the per-token mean log-ratio.
    ipo_cfg = dataclasses.replace(cfg, loss_type="ipo")
    h_mean = [f_prime(kind, math.exp(e["mw"] - e["mrw"]), alpha) - f_prime(kind, math.exp(e["ml"] - e["mrl"]), alpha)
              for e in es]
    close(compute_objective(ipo_cfg, policy, reference).losses, [(x - 1 / 0.8) ** 2 for x in h_mean])


# TRL 1.x allows an f-divergence exactly for the objectives that only see the margin h (plus SFT, which ignores it).
MARGIN_OBJECTIVES = {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop"}


def test_f_divergence_is_declared_by_the_margin_objectives():
    assert {n for n, s in LOSSES.items() if "f_divergence_type" in s.hyperparameters} == MARGIN_OBJECTIVES


@pytest.mark.parametrize("kind,alpha", [("js_divergence", 1.0), ("alpha_divergence", 0.5)])
@pytest.mark.parametrize("name", sorted(MARGIN_OBJECTIVES))
def test_f_divergence_replaces_the_margin_of(name, kind, alpha):
    b = make_batch(seed=16)
    policy, reference = dicts(b)
    cfg = cfg_for(name, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    validate_loss_config(cfg)
    transformed = []
    for e in examples(b):
        fc, fr = f_prime(kind, math.exp(e["c"]), alpha), f_prime(kind, math.exp(e["r"]), alpha)
        f_mean = (f_prime(kind, math.exp(e["mw"] - e["mrw"]), alpha)
                  - f_prime(kind, math.exp(e["ml"] - e["mrl"]), alpha))
        transformed.append(dict(e, c=fc, r=fr, h=fc - fr, h_mean=f_mean))
    close(compute_objective(cfg, policy, reference).losses, [PER_PAIR[name](e, cfg) for e in transformed])


def test_alpha_divergence_limits():
    b = make_batch(seed=10)
    policy, reference = dicts(b)
    base = compute_objective(LossConfig(beta=0.4), policy, reference).losses
    at_one = LossConfig(beta=0.4, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    close(compute_objective(at_one, policy, reference).losses, base)
    near_one = dataclasses.replace(at_one, f_alpha_divergence_coef=1.0 + 1e-5)
    close(compute_objective(near_one, policy, reference).losses, base, rel=1e-3)
    at_zero = dataclasses.replace(at_one, f_alpha_divergence_coef=0.0)
    forward = LossConfig(beta=0.4, f_divergence_type="forward_kl")
    close(compute_objective(at_zero, policy, reference).losses, compute_objective(forward, policy, reference).losses)


def test_f_divergence_only_where_defined():
    with pytest.raises(ValueError, match="not defined for loss_type 'nca_pair'"):
        validate_loss_config(LossConfig(loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence"))
    with pytest.raises(ValueError, match="has no effect"):
        validate_loss_config(LossConfig(loss_type="simpo", f_divergence_type="js_divergence"))
    validate_loss_config(LossConfig(loss_type=["sigmoid", "sft"], f_divergence_type="js_divergence"))


def test_wpo_weights_pairs_by_clamped_exp_and_passes_no_gradient():
    b = make_batch(seed=11)
    policy, reference = dicts(b, requires_grad=True)
    wc = torch.tensor([-0.5, -2.0, 0.3, -0.1, 0.9, -3.0, -0.2, 0.0], dtype=torch.float64, requires_grad=True)
    wr = torch.tensor([-0.5, -1.0, 0.4, -0.3, -0.2, -1.0, 0.1, 0.0], dtype=torch.float64, requires_grad=True)
    policy.update(chosen_wpo_logps=wc, rejected_wpo_logps=wr)
    cfg = LossConfig(loss_type="sigmoid", use_weighting=True, rpo_alpha=0.5)
    assert uses_wpo(cfg) and not uses_wpo(LossConfig())
    out = compute_objective(cfg, policy, reference)
    weight = [min(1.0, math.exp(a + c)) for a, c in zip(wc.tolist(), wr.tolist())]
    assert weight[2] == 1.0 and weight[4] == 1.0 and weight[0] < 1.0  # clamped and unclamped pairs
    plain = [x - 0.5 * e["mw"] for x, e in zip(paper_losses("sigmoid", b, cfg), examples(b))]
    close(out.losses, [w * x for w, x in zip(weight, plain)])
    close(out.metrics["wpo_weight"], weight)
    out.loss.backward()
    assert wc.grad is None and wr.grad is None
    assert policy["chosen_logps"].grad is not None
    del policy["rejected_wpo_logps"]
    with pytest.raises(ValueError, match="rejected_wpo_logps"):
        compute_objective(cfg, policy, reference)


# ---------------------------------------------------------------------------------------------------
# Reference handling.

@pytest.mark.parametrize("cfg", [LossConfig(loss_type="simpo"), LossConfig(loss_type="orpo"),
                                 LossConfig(loss_type="sft"), LossConfig(loss_type="sigmoid", reference_free=True),
                                 LossConfig(loss_type=["simpo", "sft"], rpo_alpha=1.0),
                                 LossConfig(loss_type="ipo", reference_free=True)],
                         ids=["simpo", "orpo", "sft", "reference_free", "simpo+sft", "ipo-reference_free"])
def test_reference_free_objectives_accept_none(cfg):
    assert needs_reference(cfg) is False
    b = make_batch(seed=12)
    policy, reference = dicts(b)
    without = compute_objective(cfg, policy, None)
    with_ref = compute_objective(cfg, policy, reference)  # a given reference is ignored
    close(without.losses, with_ref.losses.double())
    close(without.chosen_rewards, with_ref.chosen_rewards.double())
    assert torch.isfinite(without.losses).all()


def test_reference_free_dpo_equals_dpo_against_a_zero_reference():
    b = make_batch(seed=13)
    policy, _ = dicts(b)
    es = examples(b)
    out = compute_objective(LossConfig(reference_free=True, beta=0.2), policy, None)
    close(out.losses, [-lsig(0.2 * (e["pw"] - e["pl"])) for e in es])
    close(out.chosen_rewards, [0.2 * e["pw"] for e in es])  # sums: rewards stay comparable with DPO's


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["simpo", "sigmoid"]])
def test_reference_needing_objective_without_reference_is_a_clear_error(loss_type):
    cfg = LossConfig(loss_type=loss_type)
    assert needs_reference(cfg) is True
    policy, _ = dicts(make_batch())
    with pytest.raises(ValueError) as err:
        compute_objective(cfg, policy, None)
    message = str(err.value)
    assert "\n" not in message and "reference is None" in message and "reference_free" in message


def test_sft_runs_on_data_without_rejected_answers():
    b = make_batch(seed=17)
    policy, _ = dicts(b)
    for key in ("rejected_logps", "rejected_tokens"):
        del policy[key]
    for cfg in (LossConfig(loss_type="sft"), LossConfig(loss_type="sft", rpo_alpha=0.5)):
        out = compute_objective(cfg, policy, None)
        nll = [-e["mw"] for e in examples(b)]
        close(out.losses, [n * (1.5 if cfg.rpo_alpha else 1.0) for n in nll])
        assert torch.equal(out.rejected_rewards, torch.zeros(B, dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_type 'simpo' compares chosen with rejected answers"):
        compute_objective(LossConfig(loss_type=["sft", "simpo"]), policy, None)


def test_long_token_counts_and_float32_inputs():
    b = make_batch(seed=14)
    policy, reference = dicts(b, dtype=torch.float32)
    policy["chosen_tokens"], policy["rejected_tokens"] = b["tw"].long(), b["tl"].long()
    out = compute_objective(LossConfig(loss_type="simpo", beta=2.0), policy, None)
    assert out.losses.dtype == torch.float32
    close(out.losses, paper_losses("simpo", b, LossConfig(beta=2.0)), rel=1e-5)
    with pytest.raises(ValueError, match="chosen_tokens"):
        del policy["chosen_tokens"]
        compute_objective(LossConfig(loss_type="simpo"), policy, None)


# ---------------------------------------------------------------------------------------------------
# The registry is honest: each objective reacts to exactly the hyperparameters it declares.

PERTURB = {  # field: (base value, moved value)
    "beta": (0.1, 0.37), "label_smoothing": (1e-3, 0.15), "ipo_token_average": (True, False),
    "simpo_gamma": (0.5, 1.3), "orpo_lambda": (0.1, 0.6), "f_divergence_type": ("reverse_kl", "js_divergence"),
    "discopop_tau": (0.05, 0.4), "desirable_weight": (1.0, 1.4), "undesirable_weight": (1.0, 0.6),
    "center_rewards_coefficient": (0.01, 0.2),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_declared_hyperparameters_are_exactly_the_ones_that_matter(name):
    spec = LOSSES[name]
    policy, reference = dicts(make_batch(seed=15))
    base = LossConfig(loss_type=name, **{k: v[0] for k, v in PERTURB.items()})
    ref_losses = compute_objective(base, policy, reference).losses
    for key, (_, moved) in PERTURB.items():
        losses = compute_objective(dataclasses.replace(base, **{key: moved}), policy, reference).losses
        changed = not torch.allclose(losses, ref_losses, rtol=1e-9, atol=1e-12)
        assert changed == (key in spec.hyperparameters), f"{name}: {key} declared={key in spec.hyperparameters}"
    alpha = dataclasses.replace(base, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    moved = dataclasses.replace(alpha, f_alpha_divergence_coef=0.8)
    changed = not torch.allclose(compute_objective(alpha, policy, reference).losses,
                                 compute_objective(moved, policy, reference).losses, rtol=1e-9, atol=1e-12)
    assert changed == ("f_divergence_type" in spec.hyperparameters)
    assert spec.logps in ("sum", "mean") and "arXiv" in spec.paper and spec.formula


def test_registry_reference_flags():
    free = {n for n, s in LOSSES.items() if not s.needs_reference}
    assert free == {"simpo", "orpo", "sft", "bradley_terry"}
    assert {n for n, s in LOSSES.items() if s.logps == "mean"} == {"ipo", "simpo", "orpo", "sft"}
    assert {n for n, s in LOSSES.items() if not s.pairwise} == {"aot", "aot_unpaired"}
    assert {n for n, s in LOSSES.items() if not s.needs_rejected} == {"sft"}


# ---------------------------------------------------------------------------------------------------
# The README table.

def test_table_lists_every_registry_entry():
    table = loss_table_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    objective_rows = [r for r in rows if r.split("`")[1] in LOSSES]
    assert [r.split("`")[1] for r in objective_rows] == list(LOSSES)
    for row, spec in zip(objective_rows, LOSSES.values()):
        assert row.count("|") == 7, row  # six cells: no formula or paper breaks the table
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == spec.formula and cells[5] == spec.paper
        assert all(f"`{h}`" in cells[2] for h in spec.hyperparameters)
        assert cells[3] == ("yes" if spec.needs_reference else "no")
    for modifier in ("rpo_alpha", "use_weighting", "f_divergence_type", "reference_free", "loss_weights"):
        assert any(modifier in r.split("|")[1] for r in rows if r not in objective_rows), modifier


# ---------------------------------------------------------------------------------------------------
# Configuration errors: one line that says what to change.

@pytest.mark.parametrize("bad,expected", [
    (dict(loss_type="sigmod"), "unknown loss_type 'sigmod'; did you mean 'sigmoid'?"),
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'; DPO is loss_type 'sigmoid'"),
    (dict(loss_type=["sigmoid", "ipoo"]), "unknown loss_type 'ipoo'; did you mean 'ipo'?"),
    (dict(loss_type=[]), "loss.loss_type must be an objective name or a non-empty list"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "lists 'sigmoid' more than once"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss.loss_weights must be a list of 2 number(s)"),
    (dict(beta=0.0), "loss.beta must be positive"),
    (dict(loss_type="robust", label_smoothing=0.5), "loss.label_smoothing must be in [0, 0.5)"),
    (dict(loss_type="exo_pair"), "loss_type 'exo_pair' needs loss.label_smoothing > 0"),
    (dict(loss_type="hinge", label_smoothing=0.1), "loss.label_smoothing=0.1 has no effect on loss_type hinge"),
    (dict(loss_type="sigmoid", simpo_gamma=1.0), "loss.simpo_gamma=1.0 has no effect on loss_type sigmoid; "
                                                 "it is read by: simpo"),
    (dict(loss_type="sigmoid", ipo_token_average=False), "ipo_token_average=False has no effect"),
    (dict(f_divergence_type="js"), "unknown loss.f_divergence_type 'js'"),
    (dict(f_alpha_divergence_coef=0.5), "f_alpha_divergence_coef only acts with"),
    (dict(loss_type="aot", use_weighting=True), "cannot weight 'aot'"),
    (dict(rpo_alpha=-1.0), "loss.rpo_alpha must be null or a number >= 0"),
    (dict(loss_type="discopop", discopop_tau=0.0), "loss.discopop_tau must be positive"),
])
def test_validate_loss_config_errors(bad, expected):
    with pytest.raises(ValueError) as err:
        validate_loss_config(LossConfig(**bad))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_validate_accepts_every_objective_and_duck_typed_configs():
    for name in LOSSES:
        validate_loss_config(cfg_for(name, label_smoothing=1e-3) if name == "exo_pair" else LossConfig(loss_type=name))
    validate_loss_config(SimpleNamespace(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))
    duck = SimpleNamespace(loss_type="simpo", beta=2.0, simpo_gamma=1.0)  # missing fields take the defaults
    assert needs_reference(duck) is False
    policy, _ = dicts(make_batch())
    assert torch.isfinite(compute_objective(duck, policy, None).loss)


# ---------------------------------------------------------------------------------------------------
# A few optimiser steps on free log-prob parameters: every objective prefers the chosen answer.

@pytest.mark.parametrize("name", list(LOSSES))
def test_adam_on_free_logps_lowers_loss_and_widens_margin(name):
    torch.manual_seed(0)
    n = 4
    tokens = torch.tensor([5.0, 9.0, 3.0, 12.0])
    # log-probs = -softplus(θ)·tokens keeps every per-token mean a valid (negative) log-prob.
    theta = torch.nn.Parameter(torch.randn(2, n))
    with torch.no_grad():  # the policy starts away from the reference (see the DiscoPOP test for why)
        ref = -F.softplus(theta + torch.randn(2, n)) * tokens
    reference = {"chosen_logps": ref[0], "rejected_logps": ref[1]}
    cfg = cfg_for(name, label_smoothing=1e-3) if name == "exo_pair" else LossConfig(loss_type=name)
    opt = torch.optim.Adam([theta], lr=0.05)

    def step():
        logps = -F.softplus(theta) * tokens
        policy = {"chosen_logps": logps[0], "rejected_logps": logps[1], "chosen_tokens": tokens,
                  "rejected_tokens": tokens, "desirable": torch.ones(n, dtype=torch.bool)}  # KTO: raise them all
        return compute_objective(cfg, policy, reference)

    first = step()
    for _ in range(30):
        opt.zero_grad()
        step().loss.backward()
        opt.step()
    last = step()
    margin = lambda out: (out.chosen_rewards - out.rejected_rewards).mean().item()  # noqa: E731
    assert last.loss.item() < first.loss.item()
    assert margin(last) > margin(first)


def test_discopop_pushes_the_margin_down_at_exactly_zero():
    """A property of the paper's loss (Eq. 5, τ = 0.05), not a bug here: around βh = 0 it has a bump of width ~τ
    (local minimum near βh = -0.12, maximum near +0.07), so at policy = reference (the first step) gradient descent
    lowers the margin. Outside the bump it behaves like DPO; τ > (1 - log 2)/3 ≈ 0.103 removes the bump."""
    zero = {"chosen_logps": torch.zeros(1, requires_grad=True), "rejected_logps": torch.zeros(1)}
    reference = {"chosen_logps": torch.zeros(1), "rejected_logps": torch.zeros(1)}
    compute_objective(LossConfig(loss_type="discopop"), zero, reference).loss.backward()
    assert zero["chosen_logps"].grad.item() > 0  # descent lowers the chosen log-prob
    wide = {"chosen_logps": torch.zeros(1, requires_grad=True), "rejected_logps": torch.zeros(1)}
    compute_objective(LossConfig(loss_type="discopop", discopop_tau=0.5), wide, reference).loss.backward()
    assert wide["chosen_logps"].grad.item() < 0
