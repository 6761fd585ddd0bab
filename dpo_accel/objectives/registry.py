"""Preference objectives (DPO and its family) as pure tensor functions chosen from one registry.

Every objective maps per-example log-probs of a batch of preference pairs to per-example losses.
It knows nothing of models: the caller gives ``[B]`` tensors of per-sequence log-probs (sums over
the answer's label tokens, or per-token means) and gets ``[B]`` tensors back.

Notation used in the formulas and docstrings (all ``[B]``):

- ``π_w, π_l``: policy log-probs of the chosen (winning) and rejected (losing) answers;
  ``ref_w, ref_l`` the same under the reference model; ``π̄`` a per-token mean instead of a sum.
- ``c = π_w - ref_w`` and ``r = π_l - ref_l``: the log-ratios; ``h = c - r``: DPO's margin.
  Objectives that read ``f_divergence_type`` use ``h = f'(e^c) - f'(e^r)`` (f-DPO, f' at the
  probability ratio u = π/π_ref); with the default ``reverse_kl`` that is the plain ``c - r``.

Three entry points:

- ``preference_loss(...)``: the seed's signature (original DPO repo), on log-probs as given.
- ``compute_objective(cfg, policy, reference)``: what the training loop calls, with a ``LossConfig``
  and the log-prob module's dicts; converts sums to per-token means where an objective wants them,
  combines weighted lists of objectives, adds RPO's NLL term and WPO's pair weights.
- ``LOSSES``: the registry (name -> ``LossSpec``); ``loss_table_markdown()`` renders it for the README.

Objectives follow TRL 1.x ``DPOTrainer`` (and its CPO/ORPO trainers for SimPO/ORPO) where TRL has
them; the few deliberate differences are stated in the objective's docstring.
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_accel.config.errors import did_you_mean
from dpo_accel.config.schema import LossConfig

__all__ = [
    "LOSSES", "F_DIVERGENCES", "LossPlan", "LossSpec", "LossOutput", "Pair", "compute_objective",
    "loss_table_markdown", "needs_reference", "needs_rejected", "plan_loss", "preference_loss", "uses_wpo",
    "validate_loss_config",
]

Terms = tuple[Tensor, dict]  # (per-example losses [B], extra per-example metrics {name: [B]})

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossConfig) if f.default is not dataclasses.MISSING}
# LossConfig fields read by the combination itself rather than by one objective.
_FRAMEWORK_FIELDS = ("loss_type", "loss_weights", "beta", "reference_free", "rpo_alpha", "use_weighting")
UNITS = ("sum", "mean")


def _get(cfg: Any, name: str) -> Any:
    """A LossConfig field from a duck-typed config; a missing attribute takes the schema's default."""
    return getattr(cfg, name, _DEFAULTS.get(name))


@dataclass(frozen=True)
class Pair:
    """The log-probs of one batch in the unit (sum or mean) an objective consumes; every field is [B].

    ``ref_chosen``/``ref_rejected`` are zeros when no reference is used (reference-free DPO), and
    objectives registered with ``needs_reference=False`` never read them. ``delta`` is the margin
    ``h``: ``c - r``, or ``f'(e^c) - f'(e^r)`` for objectives that read ``f_divergence_type``.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    delta: Tensor
    # Unpaired objectives (KTO): chosen is each row's completion, rejected its mismatched KL completion;
    # ``desirable`` [B] bool is the row's label, ``kl`` the reference point gathered by the loop (data.unpaired.kto_inputs).
    desirable: Optional[Tensor] = None
    kl: Optional[Tensor] = None
    # Reward models (bradley_terry): chosen/rejected are the model's scalar rewards; ``margin`` [B] a dataset's
    # per-pair margin column (TRL's RewardTrainer), or None.
    margin: Optional[Tensor] = None

    @property
    def chosen_logratio(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> Tensor:
        return self.rejected - self.ref_rejected


@dataclass(frozen=True)
class LossSpec:
    """One registered objective.

    ``fn(pair, hp) -> (losses [B], metrics)`` where ``hp`` exposes exactly the LossConfig fields
    named in ``hyperparameters`` (so the README table cannot claim a knob the code ignores, or miss
    one it reads). ``logps`` is the per-sequence log-prob the objective consumes: "sum" over the
    answer's label tokens or per-token "mean"; ``logps_toggle`` names a boolean LossConfig field that,
    when False, switches a "mean" objective to sums (IPO's ``ipo_token_average``). ``pairwise`` is False
    for objectives whose ``losses[i]`` is a batch quantile rather than pair i's loss (AOT sorts the batch);
    ``needs_rejected`` is False for objectives that read only the chosen answer (SFT), which therefore also
    run on sft-format data that has no rejected answers. ``unpaired`` objectives (KTO) train on labelled
    single completions (``Pair.desirable``) and run alone; ``reward_model`` objectives (Bradley-Terry) train a
    sequence classifier whose scalar outputs stand in for the log-probs (dpo_accel/loops/reward.py), alone too.
    """

    name: str
    fn: Callable[[Pair, Any], Terms]
    formula: str
    paper: str
    hyperparameters: tuple[str, ...]
    needs_reference: bool
    logps: str
    logps_toggle: Optional[str] = None
    pairwise: bool = True
    needs_rejected: bool = True
    unpaired: bool = False
    reward_model: bool = False

    def unit(self, cfg: Any) -> str:
        if self.logps_toggle is not None and not _get(cfg, self.logps_toggle):
            return "sum"
        return self.logps


@dataclass
class LossOutput:
    """What ``compute_objective`` returns; B is the number of preference pairs.

    loss: scalar, the mean of ``losses`` (what to backpropagate).
    losses: [B] per-example total loss (weighted objectives + RPO term, times the WPO weight).
    chosen_rewards, rejected_rewards: [B] detached implicit rewards, ``beta * (policy - reference)``
        on summed log-probs, or ``beta * policy`` without a reference (per-token means when the first
        objective is itself reference-free: SimPO, ORPO, SFT report rewards that way).
    metrics: detached [B] extras: "nll" (per-token NLL of the chosen answer) where an NLL term is in
        the loss, "log_odds_ratio" for ORPO, "wpo_weight" with WPO, "loss_<name>" per objective of a list.
    aux_loss: detached scalar router load-balancing loss of an MoE policy (``loss`` includes coef times it;
        ``losses`` does not), None for dense models and forwards without gradients.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Optional[Tensor] = None


LOSSES: dict[str, LossSpec] = {}


def _objective(name: str, *, formula: str, paper: str, hyperparameters: tuple[str, ...],
               needs_reference: bool = True, logps: str = "sum", logps_toggle: Optional[str] = None,
               pairwise: bool = True, needs_rejected: bool = True, unpaired: bool = False,
               reward_model: bool = False):
    """Register ``fn`` under ``name``; the registry is the single source of the table and the dispatch."""
    unknown = [h for h in hyperparameters if h not in _DEFAULTS]
    if unknown or logps not in UNITS or name in LOSSES or "|" in formula:
        raise RuntimeError(f"bad registration of objective {name!r}")  # programming error, caught by tests

    def register(fn: Callable[[Pair, Any], Terms]) -> Callable[[Pair, Any], Terms]:
        LOSSES[name] = LossSpec(name, fn, formula, paper, hyperparameters, needs_reference, logps, logps_toggle,
                                pairwise, needs_rejected, unpaired, reward_model)
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# f-divergences (f-DPO): the score f'(u) at u = π/π_ref = exp(logratio), normalised so f'(1) = 0.


def _alpha_score(x: Tensor, alpha: float) -> Tensor:
    """f'(u) = (u^(α-1) - 1)/(α-1), TRL's convention; α -> 1 is reverse KL (log u), α = 0 forward KL.

    The exponent is clamped (80, or 11 in float16) as TRL does, so exp() stays finite in any dtype.
    """
    if abs(alpha - 1.0) < 1e-6:
        return x
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    t = ((alpha - 1.0) * x.to(compute)).clamp(max=11.0 if x.dtype == torch.float16 else 80.0)
    return (torch.expm1(t) / (alpha - 1.0)).to(x.dtype)


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda x, alpha: x,  # f(u) = u log u: standard DPO
    "forward_kl": lambda x, alpha: _alpha_score(x, 0.0),  # f(u) = -log u: f'(u) = 1 - 1/u
    "js_divergence": lambda x, alpha: math.log(2.0) + F.logsigmoid(x),  # f'(u) = log(2u / (1 + u))
    "alpha_divergence": _alpha_score,
}


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1-ε) log σ(z) - ε log σ(-z): the logistic loss against labels flipped with probability ε."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends; x is clamped below 0 so it never reaches -inf."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------------------------------
# The objectives. Each quotes its paper's formula; `p` is a Pair, `hp` the declared hyperparameters.

DPO_PAPER = "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model (arXiv:2305.18290)"


@_objective("sigmoid", formula="-(1-ε) log σ(βh) - ε log σ(-βh)",
            paper=DPO_PAPER + "; ε > 0: conservative DPO (Mitchell 2023, A note on DPO with noisy preferences)",
            hyperparameters=("beta", "label_smoothing", "f_divergence_type"))
def dpo_sigmoid(p: Pair, hp: Any) -> Terms:
    """DPO, Eq. 7: L = -log σ(β log π(y_w)/π_ref(y_w) - β log π(y_l)/π_ref(y_l)) = -log σ(βh).

    With label_smoothing ε > 0 this is conservative DPO (cDPO): the expected DPO loss when each
    label is flipped with probability ε, -(1-ε) log σ(βh) - ε log σ(-βh). TRL 1.x dropped ε from
    "sigmoid"; the original DPO repository and TRL 0.x have it, and so do we.
    """
    return _smoothed_logistic(hp.beta * p.delta, hp.label_smoothing), {}


@_objective("ipo", formula="(h - 1/(2β))², h on per-token means", paper=(
    "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
    "(arXiv:2310.12036)"), hyperparameters=("beta", "ipo_token_average", "f_divergence_type"),
    logps="mean", logps_toggle="ipo_token_average")
def ipo(p: Pair, hp: Any) -> Terms:
    """IPO, Eq. 17: (h_π(y_w, y_l, x) - τ⁻¹/2)² with h_π = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))], τ = β.

    By default h is built from per-token mean log-probs (TRL's choice, which TRL reports the IPO
    authors confirmed matches their results); ``ipo_token_average: false`` gives the original DPO repo's form
    on summed log-probs. With an f-divergence, f' is applied to the mean log-ratio (TRL applies it to
    the summed one and then divides by the length; the two agree for reverse_kl).
    """
    return (p.delta - 1.0 / (2.0 * hp.beta)) ** 2, {}


@_objective("hinge", formula="max(0, 1 - βh)", paper=(
    "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv:2305.10425)"),
    hyperparameters=("beta", "f_divergence_type"))
def hinge(p: Pair, hp: Any) -> Terms:
    """SLiC-HF rank calibration loss: max(0, δ - log P_θ(y+|x) + log P_θ(y-|x)).

    As in TRL: on reference log-ratios (h) instead of raw log-probs, with the margin δ = 1/β and the
    whole loss scaled by β: relu(1 - βh).
    """
    return torch.relu(1.0 - hp.beta * p.delta), {}


@_objective("robust", formula="[-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)", paper=(
    "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback (arXiv:2403.00409)"),
    hyperparameters=("beta", "label_smoothing", "f_divergence_type"))
def robust(p: Pair, hp: Any) -> Terms:
    """Robust DPO (rDPO): [(1-ε) L(βh) - ε L(-βh)] / (1-2ε) with L(z) = -log σ(z), ε = label-noise rate.

    Unlike cDPO this is an unbiased estimate of the clean-label DPO loss; ε must lie in [0, 0.5).
    """
    eps = hp.label_smoothing
    z = hp.beta * p.delta
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps), {}


@_objective("exo_pair", formula="σ(βh)[log σ(βh) - log(1-ε)] + σ(-βh)[log σ(-βh) - log ε]", paper=(
    "Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (arXiv:2402.00856)"),
    hyperparameters=("beta", "label_smoothing", "f_divergence_type"))
def exo_pair(p: Pair, hp: Any) -> Terms:
    """EXO-pref, Eq. 16 with K = 2: KL(p_fθ ‖ p_rh) where p_fθ = softmax over {y_w, y_l} of β log π/π_ref and
    p_rh = (1-ε, ε) is the smoothed preference label. Needs ε = label_smoothing > 0 (the paper uses 1e-3).
    """
    eps = hp.label_smoothing
    z = hp.beta * p.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))), {}


@_objective("bco_pair", formula="-log σ(βc) - log σ(-βr)", paper=(
    "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (arXiv:2404.04656)"),
    hyperparameters=("beta",))
def bco_pair(p: Pair, hp: Any) -> Terms:
    """BCO on pairs: -log σ(r_θ(x, y_w) - δ) - log σ(-(r_θ(x, y_l) - δ)), r_θ = β log π/π_ref.

    The paper's reward shift δ is a running mean of rewards; TRL 1.x's bco_pair (and this one) uses
    δ = 0, which keeps the loss a pure function of the batch.
    """
    return -F.logsigmoid(hp.beta * p.chosen_logratio) - F.logsigmoid(-hp.beta * p.rejected_logratio), {}


@_objective("sppo_hard", formula="(c - 1/(2β))² + (r + 1/(2β))²", paper=(
    "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675)"),
    hyperparameters=("beta",))
def sppo_hard(p: Pair, hp: Any) -> Terms:
    """SPPO, Eq. 4.7: (log π(y)/π_t(y) - η(P̂(y ≻ π_t) - 1/2))² summed over y, η = 1/β.

    The "hard" variant sets the win probability P̂ to 1 for the chosen and 0 for the rejected answer.
    """
    half = 0.5 / hp.beta
    return (p.chosen_logratio - half) ** 2 + (p.rejected_logratio + half) ** 2, {}


@_objective("nca_pair", formula="-log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)", paper=(
    "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (arXiv:2402.05369)"),
    hyperparameters=("beta",))
def nca_pair(p: Pair, hp: Any) -> Terms:
    """NCA for pairs (K = 2 responses, a winner-takes-all label): -log σ(r_w) - ½ Σ_y log σ(-r_y),
    r_y = β log π(y)/π_ref(y). Unlike DPO it rewards the chosen answer's own log-ratio, not only the margin,
    which discourages the chosen likelihood from falling along with the rejected one.
    """
    zc, zr = hp.beta * p.chosen_logratio, hp.beta * p.rejected_logratio
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr), {}


APO_PAPER = ("D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions "
             "(arXiv:2408.06266)")


@_objective("apo_zero", formula="1 - σ(βc) + σ(βr)", paper=APO_PAPER, hyperparameters=("beta",))
def apo_zero(p: Pair, hp: Any) -> Terms:
    """APO-zero, Eq. 7: L = -σ(β log π(y_w)/π_ref(y_w)) + σ(β log π(y_l)/π_ref(y_l)) (+1 so it is ≥ 0).

    For when chosen answers are better than the model's own: raise chosen, lower rejected likelihood.
    """
    return 1.0 - torch.sigmoid(hp.beta * p.chosen_logratio) + torch.sigmoid(hp.beta * p.rejected_logratio), {}


@_objective("apo_down", formula="σ(βc) + 1 - σ(β(c - r))", paper=APO_PAPER, hyperparameters=("beta",))
def apo_down(p: Pair, hp: Any) -> Terms:
    """APO-down, Eq. 8: L = σ(β log π(y_w)/π_ref(y_w)) - σ(β(log π(y_w)/π_ref(y_w) - log π(y_l)/π_ref(y_l))) (+1).

    For when chosen answers are worse than the model's own: lower both, the rejected one more.
    """
    zc = hp.beta * p.chosen_logratio
    return torch.sigmoid(zc) + 1.0 - torch.sigmoid(zc - hp.beta * p.rejected_logratio), {}


@_objective("discopop", formula="(1 - σ(βh/τ))·(-log σ(βh)) + σ(βh/τ)·exp(-βh)", paper=(
    "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language Models "
    "(arXiv:2406.08414)"), hyperparameters=("beta", "discopop_tau", "f_divergence_type"))
def discopop(p: Pair, hp: Any) -> Terms:
    """DiscoPOP / LRML, Eq. 5: f(βρ) = (1 - σ(βρ/τ)) f_dpo(βρ) + σ(βρ/τ) f_exp(βρ), f_dpo(z) = -log σ(z),
    f_exp(z) = exp(-z), ρ = h. The exponential part is computed as exp(-z + log σ(z/τ)): the same number,
    but finite where exp(-z) alone overflows (TRL's form returns inf·0 = nan for very negative margins).

    Beware (a property of the formula, same in TRL): with the paper's τ = 0.05 the loss has a bump of width ~τ
    around βh = 0 (local minimum near βh = -0.12, maximum near +0.07), so at policy = reference its gradient
    lowers the margin until margins leave that band. τ > (1 - log 2)/3 ≈ 0.103 makes the loss monotone.
    """
    z = hp.beta * p.delta
    mix = torch.sigmoid(z / hp.discopop_tau)
    return (1.0 - mix) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / hp.discopop_tau) - z), {}


AOT_PAPER = "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (arXiv:2406.05882)"


@_objective("aot", formula="-(1-ε) log σ(βd) - ε log σ(-βd), d = sort(π_w - π_l) - sort(ref_w - ref_l)",
            paper=AOT_PAPER, hyperparameters=("beta", "label_smoothing"), pairwise=False)
def aot(p: Pair, hp: Any) -> Terms:
    """AOT (paired): a smooth logistic loss on the difference of the sorted policy and reference
    log-ratio margins over the batch, i.e. first-order stochastic dominance of the policy's margin
    distribution over the reference's. ``losses[i]`` belongs to the i-th quantile, not to pair i.
    """
    d = torch.sort(p.chosen - p.rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_logistic(hp.beta * d, hp.label_smoothing), {}


@_objective("aot_unpaired", formula="-(1-ε) log σ(βd) - ε log σ(-βd), d = sort(c) - sort(r)",
            paper=AOT_PAPER, hyperparameters=("beta", "label_smoothing"), pairwise=False)
def aot_unpaired(p: Pair, hp: Any) -> Terms:
    """AOT (unpaired): the chosen log-ratio distribution should dominate the rejected one; the
    sorted chosen and rejected log-ratios are compared quantile by quantile. ``losses[i]`` is quantile i.
    """
    d = torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values
    return _smoothed_logistic(hp.beta * d, hp.label_smoothing), {}


@_objective("simpo", formula="-(1-ε) log σ(β(π̄_w - π̄_l) - γ) - ε log σ(γ - β(π̄_w - π̄_l))", paper=(
    "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734)"),
    hyperparameters=("beta", "simpo_gamma", "label_smoothing"), needs_reference=False, logps="mean")
def simpo(p: Pair, hp: Any) -> Terms:
    """SimPO, Eq. 6: -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ).

    The reward is the length-normalised (per-token mean) log-prob, no reference model; γ is the
    target reward margin. label_smoothing smooths it as in TRL's CPO trainer.
    """
    return _smoothed_logistic(hp.beta * (p.chosen - p.rejected) - hp.simpo_gamma, hp.label_smoothing), {}


@_objective("orpo", formula="-π̄_w - λ log σ(log[odds(π̄_w)/odds(π̄_l)]), odds(x) = eˣ/(1-eˣ)", paper=(
    "Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (arXiv:2403.07691)"),
    hyperparameters=("orpo_lambda",), needs_reference=False, logps="mean")
def orpo(p: Pair, hp: Any) -> Terms:
    """ORPO, Eqs. 6-7: L = L_SFT + λ L_OR, L_OR = -log σ(log odds_θ(y_w|x)/odds_θ(y_l|x)),
    odds_θ(y|x) = P_θ(y|x)/(1 - P_θ(y|x)), P_θ(y|x) = exp(mean token log-prob), L_SFT the per-token NLL of y_w.

    L_SFT is averaged per example (the paper's 1/m Σ); TRL averages it over all chosen tokens of the batch.
    """
    log_odds = (p.chosen - p.rejected) - (_log1mexp(p.chosen) - _log1mexp(p.rejected))
    nll = -p.chosen
    return nll - hp.orpo_lambda * F.logsigmoid(log_odds), {"nll": nll, "log_odds_ratio": log_odds}


@_objective("sft", formula="-π̄_w", paper=(
    "maximum likelihood on the chosen answer; the generation term of MPO, Wang et al. 2024, Enhancing the "
    "Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization (arXiv:2411.10442)"),
    hyperparameters=(), needs_reference=False, logps="mean", needs_rejected=False)
def sft(p: Pair, hp: Any) -> Terms:
    """Supervised fine-tuning on the chosen answer: the per-token negative log-likelihood -1/|y_w| log π(y_w|x).

    Per example (TRL averages over all chosen tokens of the batch, which weights long answers more).
    """
    return -p.chosen, {"nll": -p.chosen}


KTO_PAPER = ("Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv:2402.01306); "
             "unpaired rows (prompt, completion, label)")


def kl_reference_point(policy_kl: Tensor, reference_kl: Tensor) -> Tensor:
    """KTO's z_0 from one process's batch: max(0, mean(log π(y'|x) - log π_ref(y'|x))) over mismatched pairs,
    detached (the loop averages the per-process means over all processes first, as TRL gathers them)."""
    return (policy_kl - reference_kl).mean().detach().clamp(min=0)


@_objective("kto", formula="desirable: λ_D(1 - σ(β(c - z))), undesirable: λ_U(1 - σ(β(z - c))); "
            "z = max(0, mean(r)) over the batch, no gradient", paper=KTO_PAPER,
            hyperparameters=("beta", "desirable_weight", "undesirable_weight"), unpaired=True)
def kto(p: Pair, hp: Any) -> Terms:
    """KTO, Eq. 8: L = E[λ_y - v(x, y)], v = λ_D σ(β(r_θ - z_0)) for a desirable y, λ_U σ(β(z_0 - r_θ)) for an
    undesirable one; r_θ = log π(y|x)/π_ref(y|x) on summed log-probs, z_0 = KL(π(y'|x) ‖ π_ref(y'|x)) estimated
    from mismatched prompt/completion pairs of the batch (here the rejected side: c is each row's completion, r
    its mismatched one), clamped at 0 and detached, as in TRL's KTOTrainer. ``losses[i]`` is row i's term.
    """
    if p.desirable is None:
        raise ValueError("loss_type 'kto' needs each row's label (policy['desirable']); train on unpaired rows "
                         "(data.format: unpaired) or a preference set, which dpo_accel/data/unpaired.py splits into them")
    z = kl_reference_point(p.rejected, p.ref_rejected) if p.kl is None else p.kl.detach()
    z = z.to(p.chosen.dtype)
    c = p.chosen_logratio
    desirable = p.desirable.to(torch.bool)
    losses = torch.where(desirable, hp.desirable_weight * (1.0 - torch.sigmoid(hp.beta * (c - z))),
                         hp.undesirable_weight * (1.0 - torch.sigmoid(hp.beta * (z - c))))
    return losses, {"kl": z.expand_as(c).detach()}


@_objective("bradley_terry", formula="-log σ(π_w - π_l - m) + η(π_w + π_l)², π the reward model's outputs",
            paper=("Bradley & Terry 1952 pairwise model; reward-model training as in Ouyang et al. 2022 (arXiv:2203.02155), "
                   "margin m from Touvron et al. 2023 (arXiv:2307.09288), η centering from Eisenstein et al. 2023 "
                   "(arXiv:2312.09244); trains an AutoModelForSequenceClassification"),
            hyperparameters=("center_rewards_coefficient",), needs_reference=False, reward_model=True)
def bradley_terry(p: Pair, hp: Any) -> Terms:
    """A reward model's loss, as TRL's RewardTrainer: -log σ(r(x, y_w) - r(x, y_l) - m) with the dataset's margin m
    (0 without a margin column), plus η·(r_w + r_l)² (TRL: η·mean over the batch) pulling rewards to mean 0.
    ``p.chosen``/``p.rejected`` are the model's scalar rewards, not log-probs.
    """
    diff = p.chosen - p.rejected
    if p.margin is not None:
        diff = diff - p.margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if hp.center_rewards_coefficient:
        losses = losses + hp.center_rewards_coefficient * (p.chosen + p.rejected) ** 2
    return losses, {}


# Additions that apply on top of any objective (rows of the second README table).
MODIFIERS: tuple[tuple[str, str, str], ...] = (
    ("loss_type: [a, b] + loss_weights", "Σ_i w_i L_i", "TRL's multi-loss DPO, e.g. MPO (arXiv:2411.10442)"),
    ("rpo_alpha", "L + α·(-π̄_w)", "Pang et al. 2024, Iterative Reasoning Preference Optimization (arXiv:2404.19733)"),
    ("use_weighting", "L · min(1, exp(ω_w + ω_l)), ω = mean_t[log p_t - log Σ_v p_v²], no gradient",
     "Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization (arXiv:2406.11827)"),
    ("f_divergence_type (+ f_alpha_divergence_coef)",
     "h = f'(e^c) - f'(e^r): reverse_kl log u, forward_kl 1 - 1/u, js_divergence log(2u/(1+u)), "
     "alpha_divergence (u^(α-1) - 1)/(α-1)",
     "Wang et al. 2023, Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence "
     "Constraints (arXiv:2309.16240)"),
    ("reference_free", "ref_w = ref_l = 0 (a uniform reference; no reference model is loaded)", DPO_PAPER),
)


# --------------------------------------------------------------------------------------------------
# Configuration: resolve and check a LossConfig (duck-typed) once, in one place.


# Names people know these objectives by -> where they live here (for the unknown-loss_type error).
_KNOWN_AS = {
    "dpo": "DPO is loss_type 'sigmoid'", "cdpo": "conservative DPO is loss_type 'sigmoid' with loss.label_smoothing",
    "slic": "SLiC is loss_type 'hinge'", "rdpo": "robust DPO is loss_type 'robust'",
    "rpo": "RPO is loss.rpo_alpha on top of any loss_type", "wpo": "WPO is loss.use_weighting: true",
    "mpo": "MPO is loss_type [sigmoid, bco_pair, sft] with loss.loss_weights",
    "fdpo": "f-DPO is loss.f_divergence_type", "cpo": "CPO is not implemented; SimPO is loss_type 'simpo'",
}


def _closest(word: str, choices) -> str:
    return did_you_mean(word, choices, cutoff=0.6, list_choices=True)


def _plan(cfg: Any) -> list[tuple[LossSpec, float]]:
    """The (objective, weight) list of a config, after the checks without which the loss would be wrong
    or non-finite. Raises ValueError with one line saying what to change."""
    names = _get(cfg, "loss_type")
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"loss.loss_type must be an objective name or a non-empty list of names, got {names!r}")
    for name in names:
        if name not in LOSSES:
            known = _KNOWN_AS.get(name.lower().replace("-", "").replace("_", ""))
            raise ValueError(f"unknown loss_type '{name}'" + (f"; {known}" if known else _closest(name, LOSSES)))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"loss.loss_type lists '{dupes[0]}' more than once; give each objective once and "
                         "weight it with loss.loss_weights")
    weights = _get(cfg, "loss_weights")
    if weights is None:
        weights = [1.0] * len(names)
    if (not isinstance(weights, (list, tuple)) or len(weights) != len(names)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise ValueError(f"loss.loss_weights must be a list of {len(names)} number(s), one per loss_type entry "
                         f"{list(names)}, got {weights!r}")
    beta, eps = _get(cfg, "beta"), _get(cfg, "label_smoothing")
    if not beta > 0:
        raise ValueError(f"loss.beta must be positive, got {beta}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {eps}")
    if "exo_pair" in names and eps <= 0.0:
        raise ValueError("loss_type 'exo_pair' needs loss.label_smoothing > 0 (the EXO paper uses 1e-3)")
    if any("discopop_tau" in LOSSES[n].hyperparameters for n in names) and not _get(cfg, "discopop_tau") > 0:
        raise ValueError(f"loss.discopop_tau must be positive, got {_get(cfg, 'discopop_tau')}")
    fdiv = _get(cfg, "f_divergence_type")
    if fdiv not in F_DIVERGENCES:
        raise ValueError(f"unknown loss.f_divergence_type '{fdiv}'{_closest(fdiv, F_DIVERGENCES)}")
    unpaired = [n for n in names if LOSSES[n].unpaired or LOSSES[n].reward_model]
    if unpaired and (len(names) > 1 or _get(cfg, "rpo_alpha") is not None or _get(cfg, "use_weighting")):
        raise ValueError(f"loss_type '{unpaired[0]}' trains {'a reward model' if LOSSES[unpaired[0]].reward_model else 'on labelled single completions'}: use it alone, without "
                         "loss.rpo_alpha or loss.use_weighting (they read a policy's log-probs of a pair)")
    if any(LOSSES[n].unpaired for n in names) and not (_get(cfg, "desirable_weight") > 0 and _get(cfg, "undesirable_weight") > 0):
        raise ValueError("loss.desirable_weight and loss.undesirable_weight must be positive")
    rpo = _get(cfg, "rpo_alpha")
    if rpo is not None and not (isinstance(rpo, (int, float)) and rpo >= 0):
        raise ValueError(f"loss.rpo_alpha must be null or a number >= 0, got {rpo!r}")
    sorting = [n for n in names if not LOSSES[n].pairwise]
    if _get(cfg, "use_weighting") and sorting:
        raise ValueError(f"loss.use_weighting (WPO) cannot weight '{sorting[0]}': it sorts the batch, so its "
                         "losses are not per pair; drop one of them")
    return [(LOSSES[n], float(w)) for n, w in zip(names, weights)]


def validate_loss_config(cfg: Any) -> list[tuple[LossSpec, float]]:
    """Start-up check of a LossConfig: everything ``compute_objective`` needs, plus settings that would be
    silently ignored (a non-default hyperparameter no chosen objective reads, an f-divergence on an objective
    it is not defined for). Raises ValueError with one line, e.g.
    "unknown loss_type 'sigmod'; did you mean 'sigmoid'?". Returns the (objective, weight) terms."""
    plan = _plan(cfg)
    specs = [s for s, _ in plan]
    chosen = ", ".join(s.name for s in specs)
    for name in _DEFAULTS:
        if name in _FRAMEWORK_FIELDS or name == "f_alpha_divergence_coef" or _get(cfg, name) == _DEFAULTS[name]:
            continue
        if not any(name in s.hyperparameters for s in specs):
            readers = ", ".join(s.name for s in LOSSES.values() if name in s.hyperparameters)
            raise ValueError(f"loss.{name}={_get(cfg, name)!r} has no effect on loss_type {chosen}; "
                             f"it is read by: {readers}")
    fdiv = _get(cfg, "f_divergence_type")
    if fdiv != "reverse_kl":
        # The f-DPO derivation leaves a β·log Z(x) term that only cancels in the chosen-minus-rejected margin.
        bad = [s.name for s in specs if s.needs_reference and "f_divergence_type" not in s.hyperparameters]
        if bad:
            ok = ", ".join(s.name for s in LOSSES.values() if "f_divergence_type" in s.hyperparameters)
            raise ValueError(f"loss.f_divergence_type '{fdiv}' is not defined for loss_type '{bad[0]}' (only for "
                             f"margin-based objectives: {ok}); use reverse_kl with it")
    if fdiv != "alpha_divergence" and _get(cfg, "f_alpha_divergence_coef") != _DEFAULTS["f_alpha_divergence_coef"]:
        raise ValueError("loss.f_alpha_divergence_coef only acts with loss.f_divergence_type: alpha_divergence")
    return plan


@dataclass(frozen=True)
class LossPlan:
    """A LossConfig resolved once at start-up (`plan_loss`): its weighted objectives and what they read.
    Every function below that takes a config also takes a LossPlan, and then derives nothing again."""

    config: Any
    terms: tuple[tuple[LossSpec, float], ...]
    needs_reference: bool
    needs_rejected: bool
    wpo: bool
    unpaired: bool = False  # KTO: labelled single completions (the loop adds labels and the gathered KL)
    reward_model: bool = False  # bradley_terry: the run trains a sequence classifier (dpo_accel/loops/reward.py)


def plan_loss(cfg: Any) -> LossPlan:
    """`validate_loss_config` and the resolution in one call (a LossPlan is returned as it is)."""
    if isinstance(cfg, LossPlan):
        return cfg
    terms = tuple(validate_loss_config(cfg))
    wpo = bool(_get(cfg, "use_weighting"))
    return LossPlan(cfg, terms, _needs_reference(cfg, terms), wpo or any(s.needs_rejected for s, _ in terms), wpo,
                    any(s.unpaired for s, _ in terms), any(s.reward_model for s, _ in terms))


def _resolved(cfg: Any) -> tuple[Any, tuple[tuple[LossSpec, float], ...]]:
    """(config, terms): a LossPlan's own, or a bare config's derived on the spot (tests, the seed API)."""
    return (cfg.config, cfg.terms) if isinstance(cfg, LossPlan) else (cfg, tuple(_plan(cfg)))


def needs_reference(cfg: Any) -> bool:
    """True when some objective of ``cfg`` reads reference log-probs (and ``reference_free`` is off):
    the loop loads/runs a reference model exactly then."""
    return cfg.needs_reference if isinstance(cfg, LossPlan) else _needs_reference(*_resolved(cfg))


def _needs_reference(cfg: Any, plan: list[tuple[LossSpec, float]]) -> bool:
    return not _get(cfg, "reference_free") and any(spec.needs_reference for spec, _ in plan)


def needs_rejected(cfg: Any) -> bool:
    """True when the loss reads the rejected answers' log-probs: some objective compares chosen with
    rejected, or WPO weights the pair by both. False for ``sft`` alone, so the loop skips the rejected
    half of the forward when it trains sft on preference data (prompt -> chosen)."""
    if isinstance(cfg, LossPlan):
        return cfg.needs_rejected
    return uses_wpo(cfg) or any(spec.needs_rejected for spec, _ in _plan(cfg))


def uses_wpo(cfg: Any) -> bool:
    """True when the loss weights pairs by WPO: the log-prob module must then also return
    ``chosen_wpo_logps``/``rejected_wpo_logps``."""
    return cfg.wpo if isinstance(cfg, LossPlan) else bool(_get(cfg, "use_weighting"))


# --------------------------------------------------------------------------------------------------
# Evaluation.


class _Logps:
    """Per-example log-probs of a batch in either unit. Sums are given; means are sums / token counts.
    Without token counts (the seed signature) the values are used as given in both units."""

    def __init__(self, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 chosen_tokens: Optional[Tensor] = None, rejected_tokens: Optional[Tensor] = None):
        self.sums = (chosen, rejected, ref_chosen, ref_rejected)
        self.tokens = (chosen_tokens, rejected_tokens)

    def unit(self, unit: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return {"sum": lambda: self.sums, "mean": self._means}[unit]()

    def _means(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tc, tr = self.tokens
        if tc is None:
            return self.sums
        c, r, rc, rr = self.sums
        tc, tr = tc.to(c.dtype).clamp(min=1.0), tr.to(c.dtype).clamp(min=1.0)
        return c / tc, r / tr, rc / tc, rr / tr


def _hyper_view(cfg: Any, names: tuple[str, ...]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{n: _get(cfg, n) for n in names})


def _evaluate(cfg: Any, plan: list[tuple[LossSpec, float]], logps: _Logps,
              extra: tuple = (None, None, None)) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the objectives' per-example losses [B] and their metrics; ``extra``: KTO's
    (desirable, kl) and a reward model's margin, see Pair."""
    fprime = F_DIVERGENCES[_get(cfg, "f_divergence_type")]
    coef = float(_get(cfg, "f_alpha_divergence_coef"))
    total: Any = 0.0
    metrics: dict[str, Tensor] = {}
    for spec, weight in plan:
        c, r, rc, rr = logps.unit(spec.unit(cfg))
        if "f_divergence_type" in spec.hyperparameters:
            delta = fprime(c - rc, coef) - fprime(r - rr, coef)
        else:
            delta = (c - rc) - (r - rr)
        losses, extra = spec.fn(Pair(c, r, rc, rr, delta, *extra), _hyper_view(cfg, spec.hyperparameters))
        total = total + weight * losses
        metrics.update(extra)
        if len(plan) > 1:
            metrics[f"loss_{spec.name}"] = losses
    return total, metrics


def _rewards(cfg: Any, plan, logps: _Logps, with_reference: bool) -> tuple[Tensor, Tensor]:
    if plan[0][0].reward_model:  # the reward model's own outputs
        return logps.sums[0].detach(), logps.sums[1].detach()
    unit = "sum" if with_reference else plan[0][0].unit(cfg)
    c, r, rc, rr = logps.unit(unit)
    beta = _get(cfg, "beta")
    return (beta * (c - rc)).detach(), (beta * (r - rr)).detach()


def _tensor(d: Mapping[str, Tensor], key: str, who: str, why: str) -> Tensor:
    if key not in d:
        raise ValueError(f"{who} log-probs lack '{key}' ({why}); have: {', '.join(sorted(d))}")
    return d[key]


def compute_objective(cfg: Any, policy: Mapping[str, Tensor], reference: Optional[Mapping[str, Tensor]]) -> LossOutput:
    """The loss of one micro-batch for the training loop.

    cfg: a LossPlan (`plan_loss`, what the loop passes), or a LossConfig (any object with its attributes;
        missing ones take the schema defaults), resolved on each call.
    policy: [B] tensors from the log-prob module: ``chosen_logps``/``rejected_logps`` (sums over label
        tokens, float32), ``chosen_tokens``/``rejected_tokens`` (label-token counts), and with
        ``use_weighting`` ``chosen_wpo_logps``/``rejected_wpo_logps`` (per-token means of
        log p_t - log Σ_v p_v², TRL's WPO alignment). The ``rejected_*`` keys may be absent (sft-format
        data) when every objective reads only the chosen answer; ``rejected_rewards`` are then zeros.
    reference: the same two ``*_logps`` keys under the reference model, or None; None is accepted
        exactly when ``needs_reference(cfg)`` is False (a given reference is then ignored).
        Unpaired objectives (KTO) also read ``desirable`` [B] bool and, when present, ``kl`` (a scalar: the
        reference point over all processes, `data.unpaired.kto_inputs`); without ``kl`` it is this batch's own.

    Per example: L = Σ_i w_i L_i  (+ rpo_alpha · NLL(chosen)), times the WPO pair weight
    clamp(exp(ω_w + ω_l), max=1) (detached) when ``use_weighting``; the order TRL 0.x uses.
    """
    cfg, plan = _resolved(cfg)
    with_reference = _needs_reference(cfg, plan)
    c = _tensor(policy, "chosen_logps", "policy", "summed log-probs of the chosen answers")
    has_rejected = "rejected_logps" in policy
    if not has_rejected:
        pairwise = [s.name for s, _ in plan if s.needs_rejected]
        if pairwise:
            raise ValueError(f"loss_type '{pairwise[0]}' compares chosen with rejected answers but the batch has "
                             "none (sft-format data?); use loss_type: sft or a preference dataset")
    r = policy["rejected_logps"] if has_rejected else torch.zeros_like(c)
    if with_reference:
        if reference is None:
            names = ", ".join(s.name for s, _ in plan if s.needs_reference)
            raise ValueError(f"loss_type {names} needs reference log-probs but reference is None; "
                             "run a reference model (reference.mode) or set loss.reference_free: true")
        # Detached: a reference computed by the policy itself (adapter switched off) must pass no gradient.
        rc = _tensor(reference, "chosen_logps", "reference", "needed by the loss").detach().to(c.dtype)
        rr = _tensor(reference, "rejected_logps", "reference", "needed by the loss").detach().to(c.dtype)
    else:
        rc, rr = torch.zeros_like(c), torch.zeros_like(r)
    needs_tokens = _get(cfg, "rpo_alpha") is not None or any(s.unit(cfg) == "mean" for s, _ in plan)
    tokens = (None, None)
    if needs_tokens:
        why = "per-token means are needed by the loss"
        tokens = (_tensor(policy, "chosen_tokens", "policy", why),
                  _tensor(policy, "rejected_tokens", "policy", why) if has_rejected else torch.ones_like(c))
    logps = _Logps(c, r, rc, rr, *tokens)

    losses, metrics = _evaluate(cfg, plan, logps, (policy.get("desirable"), policy.get("kl"), policy.get("margin")))
    rpo_alpha = _get(cfg, "rpo_alpha")
    if rpo_alpha is not None:
        nll = -logps.unit("mean")[0]  # RPO (v3 of the paper): per-token NLL of the chosen answer
        losses = losses + rpo_alpha * nll
        metrics["nll"] = nll
    if uses_wpo(cfg):
        why = "use_weighting needs the WPO log-probs"
        omega = _tensor(policy, "chosen_wpo_logps", "policy", why)
        if has_rejected:
            omega = omega + _tensor(policy, "rejected_wpo_logps", "policy", why)
        weight = torch.exp(omega.detach().to(losses.dtype)).clamp(max=1.0)
        losses = losses * weight
        metrics["wpo_weight"] = weight
    chosen_rewards, rejected_rewards = _rewards(cfg, plan, logps, with_reference)
    loss, aux_loss = losses.mean(), policy.get("aux_loss")
    if aux_loss is not None:  # MoE policy: + coef * router load-balancing loss, as TRL adds it
        coef = _get(cfg, "router_aux_loss_coef")
        if coef is None:  # the model config's coefficient, passed along by the log-prob module
            coef = float(policy["aux_loss_coef"]) if "aux_loss_coef" in policy else 0.0
        loss = loss + coef * aux_loss.to(loss.dtype)
        aux_loss = aux_loss.detach()
    return LossOutput(loss=loss, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      metrics={k: v.detach() for k, v in metrics.items()}, aux_loss=aux_loss)


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    reference_chosen_logps: Optional[Tensor], reference_rejected_logps: Optional[Tensor],
                    beta: float, label_smoothing: float = 0.0, ipo: bool = False, reference_free: bool = False,
                    *, loss_type: Any = None, **hparams: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The seed's (original DPO repository's) loss on per-example log-probs as the caller gives them.

    All inputs are [B] (sums or per-token means: the objective consumes them as given, so pass means for
    simpo/orpo/sft and for token-averaged IPO). Returns (losses [B], chosen_rewards [B], rejected_rewards [B])
    with rewards = beta * (policy - reference), detached; the reference counts as 0 when it is not used
    (``reference_free`` or a reference-free objective), and may then be None.

    Defaults give DPO: -log σ(β h), h = (π_w - ref_w) - (π_l - ref_l); ``label_smoothing`` ε gives
    conservative DPO -(1-ε) log σ(βh) - ε log σ(-βh); ``ipo=True`` gives IPO (h - 1/(2β))².
    ``loss_type`` picks any registry objective (or a list, with ``loss_weights=``); other LossConfig
    fields (simpo_gamma, f_divergence_type, ...) go in ``hparams``.
    """
    if ipo and loss_type not in (None, "ipo"):
        raise ValueError(f"ipo=True selects loss_type 'ipo' but loss_type is {loss_type!r}; pass only one")
    for name in hparams:
        if name not in _DEFAULTS or name in ("loss_type", "beta", "label_smoothing", "reference_free"):
            raise TypeError(f"preference_loss() got an unexpected hyperparameter '{name}'"
                            f"{_closest(name, [n for n in _DEFAULTS if n not in _FRAMEWORK_FIELDS])}")
        if name in ("rpo_alpha", "use_weighting") and hparams[name] not in (None, False):
            raise ValueError(f"preference_loss has no token counts or WPO log-probs for '{name}'; "
                             "use compute_objective(cfg, policy, reference)")
    cfg = dataclasses.replace(LossConfig(), loss_type="ipo" if ipo else (loss_type or "sigmoid"), beta=beta,
                              label_smoothing=label_smoothing, reference_free=reference_free, **hparams)
    plan = _plan(cfg)
    with_reference = _needs_reference(cfg, plan)
    c, r = policy_chosen_logps, policy_rejected_logps
    if with_reference:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"loss_type {cfg.loss_type!r} needs reference log-probs; pass them or reference_free=True")
        rc, rr = reference_chosen_logps.detach().to(c.dtype), reference_rejected_logps.detach().to(c.dtype)
    else:
        rc, rr = torch.zeros_like(c), torch.zeros_like(r)
    logps = _Logps(c, r, rc, rr)
    losses, _ = _evaluate(cfg, plan, logps)
    return (losses, *_rewards(cfg, plan, logps, with_reference))


# --------------------------------------------------------------------------------------------------
# Documentation.


def loss_table_markdown() -> str:
    """The README's table of objectives (and of modifiers that apply to any of them), from the registry."""
    lines = [
        "Notation: π_w, π_l are the policy's summed log-probs of the chosen and rejected answer (π̄: per-token "
        "means), ref_w, ref_l the reference's; c = π_w - ref_w, r = π_l - ref_l; h = c - r, or f'(e^c) - f'(e^r) "
        "for objectives that read f_divergence_type; σ is the logistic function.",
        "",
        "| objective | formula | key hyperparameters | reference needed | log-probs | paper |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in LOSSES.values():
        knobs = ", ".join(f"`{h}`" for h in spec.hyperparameters) or "-"
        unit = spec.logps if spec.logps_toggle is None else f"{spec.logps} (`{spec.logps_toggle}: false`: sum)"
        lines.append(f"| `{spec.name}` | {spec.formula} | {knobs} | {'yes' if spec.needs_reference else 'no'} "
                     f"| {unit} | {spec.paper} |")
    lines += ["", "Modifiers, combinable with any objective above:", "",
              "| setting | effect | paper |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {effect} | {paper} |" for key, effect, paper in MODIFIERS]
    return "\n".join(lines) + "\n"
