"""Objectives: (token log-probs, batch) -> (loss, metrics). The glue between the loop and ``allo.losses``.

Preference batches are slot-major: rows [0, B) are chosen, rows [B, 2B) rejected (see data/tokenize.py).
"""
from __future__ import annotations

import torch

from allo import losses
from allo.config import DPOConfig, ForgetConfig, ImproveConfig, NPOConfig, SimPOConfig
from allo.logprobs import response_mask


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[0] // 2
    return t[:n], t[n:]


def _pair_metrics(out) -> dict:
    return {"rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/margin": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float()}


def sft(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Token-mean negative log-likelihood of the responses."""
    mask = response_mask(batch["labels"])
    return -(logps * mask).sum() / mask.sum().clamp(min=1), {}


def preference(cfg: DPOConfig):
    """DPO / IPO on a chosen-rejected batch (SimPO with `loss_type: simpo`)."""
    if cfg.loss_type == "simpo":
        return simpo(SimPOConfig(beta=cfg.beta, gamma=cfg.simpo_gamma))

    def objective(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = response_mask(batch["labels"])
        (pc, pr), (mc, mr), (rc, rr) = _halves(logps), _halves(mask), _halves(batch["ref_logps"])
        reduce = losses.masked_mean if cfg.loss_type == "ipo" else losses.masked_sum
        args = (reduce(pc, mc), reduce(pr, mr), reduce(rc, mc), reduce(rr, mr))
        out = (losses.ipo_loss(*args, beta=cfg.beta) if cfg.loss_type == "ipo"
               else losses.dpo_loss(*args, beta=cfg.beta, label_smoothing=cfg.label_smoothing))
        return _with_nll(out.losses.mean(), _pair_metrics(out), pc, mc, cfg.nll_weight)
    return objective


def _with_nll(loss: torch.Tensor, metrics: dict, chosen: torch.Tensor, mask: torch.Tensor,
              weight: float) -> tuple[torch.Tensor, dict]:
    """loss + weight · mean over pairs of the chosen response's token-mean NLL (the DPO+NLL option)."""
    if not weight:
        return loss, metrics
    nll = -losses.masked_mean(chosen, mask)
    return loss + weight * nll.mean(), {**metrics, "nll/chosen": nll.detach()}


def simpo(cfg: SimPOConfig):
    """SimPO: length-normalised preference margin, no reference model."""
    def objective(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = response_mask(batch["labels"])
        (pc, pr), (mc, mr) = _halves(logps), _halves(mask)
        out = losses.simpo_loss(losses.masked_mean(pc, mc), losses.masked_mean(pr, mr), cfg.beta, cfg.gamma)
        return out.losses.mean(), _pair_metrics(out)
    return objective


def npo(cfg: NPOConfig):
    """Sequence-level NPO on the rejected responses (one slot)."""
    def objective(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = response_mask(batch["labels"])
        policy, ref = losses.masked_sum(logps, mask), losses.masked_sum(batch["ref_logps"], mask)
        return losses.npo_loss(policy, ref, cfg.beta).mean(), {"logratio": (policy - ref).detach()}
    return objective


def forget(cfg: ForgetConfig):
    """ALLO token-weighted NPO (docs/method.md §3); weights come from the reward model's keep-probabilities."""
    def objective(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = response_mask(batch["labels"])
        weights = losses.token_weights(batch["keep_probs"], cfg.token_weight) * mask
        loss = losses.token_npo_loss(logps, batch["ref_logps"], weights, mask, cfg.beta)
        frac = (weights != 0).sum() / mask.sum().clamp(min=1)
        return loss, {"weighted_token_fraction": frac}
    return objective


def improve(cfg: ImproveConfig):
    """ALLO noise-masked DPO (docs/method.md §4)."""
    def objective(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = response_mask(batch["labels"])
        (pc, pr), (mc, mr), (rc, rr) = _halves(logps), _halves(mask), _halves(batch["ref_logps"])
        out = losses.noise_masked_dpo_loss(pc, pr, rc, rr, mc, mr, cfg.beta, cfg.epsilon, cfg.k_basis,
                                           cfg.noise_side)
        kept = out.rejected_weights.sum() / mr.sum().clamp(min=1)
        return _with_nll(out.losses.mean(), {**_pair_metrics(out), "rejected_kept_fraction": kept}, pc, mc,
                         cfg.nll_weight)
    return objective
