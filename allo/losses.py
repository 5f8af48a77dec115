"""ALLO's losses and the baselines, as pure functions of per-token log-probabilities.

No I/O, no DeepSpeed: everything here runs in float64 on a laptop and is tested against hand-computed
numbers (tests/test_losses.py). Per-token inputs are (N, T) tensors aligned with ``input_ids`` with a
bool ``mask`` of response tokens; sequence inputs are (N,). Each loss returns per-example losses (or a
scalar for the token-normalised ones) plus detached diagnostics.

Paper: Chen et al., "Not Everything is All You Need" (arXiv 2406.12606); equation numbers refer to
``docs/method.md`` sections.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLoss(NamedTuple):
    losses: torch.Tensor            # (N,) per pair
    chosen_rewards: torch.Tensor    # (N,) β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor  # (N,)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(values, mask) / mask.sum(-1).clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> PairLoss:
    """DPO (Rafailov et al. 2023, eq. 7) on sequence log-probs; `label_smoothing` gives conservative DPO."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    logits = beta * (chosen - rejected)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> PairLoss:
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))². Pass length-averaged log-probs, as TRL does."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float,
               gamma: float) -> PairLoss:
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β·(avg log π_w − avg log π_l) − γ); no reference model."""
    losses = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return PairLoss(losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach())


def npo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Sequence-level NPO (Zhang et al. 2024): −(2/β)·log σ(−β·(log π − log π_ref)), per sequence."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy - ref))


def token_weights(keep_prob: torch.Tensor, mode: str) -> torch.Tensor:
    """docs/method.md §2: w from the reward model's keep-probability p. indicator 1[p<0.5]; soft 1−p; raw p;
    uniform 1 (every token of the response: the "without token reward" control)."""
    if mode == "uniform":
        return torch.ones_like(keep_prob)
    if mode == "indicator":
        return (keep_prob < 0.5).to(keep_prob.dtype)
    if mode == "soft":
        return 1.0 - keep_prob
    if mode == "raw":
        return keep_prob
    raise ValueError(f"unknown token weight mode {mode!r} (indicator, soft, raw, uniform)")


def token_npo_loss(policy: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """docs/method.md §3: L = −(1/Σ 1[w≠0]) · Σ w·log σ(−β δ), δ = log π − log π_ref, over every token of the
    batch.

    A batch with no weighted token gives 0 (not NaN), so a micro-batch of clean responses is harmless.
    """
    w = weights * mask
    count = (w != 0).sum().clamp(min=1)
    return -(w * F.logsigmoid(-beta * (policy - ref))).sum() / count


def _k_per_row(mask: torch.Tensor, epsilon: float, k_basis: str) -> torch.Tensor:
    """K = ⌊ε·L⌋ per row, L = response length or padded width; at least 1, at most the response length."""
    n_valid = mask.sum(-1)
    basis = n_valid if k_basis == "response" else torch.full_like(n_valid, mask.shape[-1])
    k = torch.floor(epsilon * basis.to(torch.float64)).long()
    return torch.minimum(k.clamp(min=1), n_valid.clamp(min=1))


def key_error_tokens(delta: torch.Tensor, mask: torch.Tensor, epsilon: float, k_basis: str) -> torch.Tensor:
    """Rejected side of docs/method.md §4: keep the K response tokens with the lowest implicit reward δ (ties at the
    threshold are kept, so at step 0, where every δ is 0, all tokens are kept: plain DPO)."""
    k = _k_per_row(mask, epsilon, k_basis)
    ranked = torch.where(mask, delta, torch.full_like(delta, float("inf"))).sort(-1).values
    threshold = ranked.gather(-1, (k - 1).unsqueeze(-1))
    return mask & (delta <= threshold)


def noise_free_tokens(delta: torch.Tensor, mask: torch.Tensor, epsilon: float, k_basis: str) -> torch.Tensor:
    """Chosen side with `noise_side: both`: drop the K tokens whose δ is highest (top percentile) as noise.
    Ties at the threshold are kept, so at step 0 nothing is dropped; at least one token is always kept."""
    n_valid = mask.sum(-1)
    k = torch.minimum(_k_per_row(mask, epsilon, k_basis), (n_valid - 1).clamp(min=0))
    ranked = torch.where(mask, delta, torch.full_like(delta, float("inf"))).sort(-1).values
    keep_idx = (n_valid - k - 1).clamp(min=0)
    threshold = ranked.gather(-1, keep_idx.unsqueeze(-1))
    return mask & (delta <= threshold)


class NoiseMaskedDPO(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_weights: torch.Tensor    # q^w (N, T)
    rejected_weights: torch.Tensor  # q^l (N, T)


def noise_masked_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                          ref_rejected: torch.Tensor, mask_chosen: torch.Tensor, mask_rejected: torch.Tensor,
                          beta: float, epsilon: float, k_basis: str = "response",
                          noise_side: str = "rejected") -> NoiseMaskedDPO:
    """docs/method.md §4: −log σ(β [Σ_j q^w_j δ^w_j − Σ_j q^l_j δ^l_j]) with per-token δ = log π − log π_ref.

    q is recomputed from the current δ at every step and carries no gradient (a selection, not a weight).
    """
    d_w = (policy_chosen - ref_chosen) * mask_chosen
    d_l = (policy_rejected - ref_rejected) * mask_rejected
    with torch.no_grad():
        q_l = key_error_tokens(d_l.detach(), mask_rejected, epsilon, k_basis).to(d_l.dtype)
        if noise_side == "both":
            q_w = noise_free_tokens(d_w.detach(), mask_chosen, epsilon, k_basis).to(d_w.dtype)
        elif noise_side == "rejected":
            q_w = mask_chosen.to(d_w.dtype)
        else:
            raise ValueError(f"unknown noise_side {noise_side!r} (rejected, both)")
    chosen = (q_w * d_w).sum(-1)
    rejected = (q_l * d_l).sum(-1)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return NoiseMaskedDPO(losses, beta * d_w.sum(-1).detach(), beta * d_l.sum(-1).detach(), q_w, q_l)
