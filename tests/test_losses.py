"""Every loss against numbers worked out by hand (float64). ln 2 ≈ 0.693147 is the step-0 value of DPO."""
from __future__ import annotations

import math

import torch

from allo import losses

D = torch.float64


def t(*v):
    return torch.tensor(v, dtype=D)


def softplus(x: float) -> float:  # −log σ(x) = log(1 + e^{−x})
    return math.log1p(math.exp(-x))


def test_dpo_by_hand():
    """π_w=−1, π_l=−2, ref −1.5 both, β=0.1: h = 0.5 − (−0.5) = 1, loss = log(1+e^{−0.1}) = 0.644397."""
    out = losses.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert math.isclose(out.losses.item(), 0.6443966600735709, rel_tol=1e-12)
    assert math.isclose(out.chosen_rewards.item(), 0.05) and math.isclose(out.rejected_rewards.item(), -0.05)


def test_dpo_step0_is_ln2_and_label_smoothing():
    out = losses.dpo_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0), beta=0.1)
    assert math.isclose(out.losses.item(), math.log(2), rel_tol=1e-12)
    # ε = 0.25, h·β = 0.1: 0.75·softplus(0.1) + 0.25·softplus(−0.1)
    out = losses.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.25)
    assert math.isclose(out.losses.item(), 0.75 * softplus(0.1) + 0.25 * softplus(-0.1), rel_tol=1e-12)


def test_ipo_by_hand():
    """h = 1, β = 0.1 → (1 − 1/(2·0.1))² = (1 − 5)² = 16."""
    assert math.isclose(losses.ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1).losses.item(), 16.0)


def test_simpo_by_hand():
    """avg π_w = −1, avg π_l = −2, β = 2, γ = 0.5: −log σ(2·1 − 0.5) = log(1 + e^{−1.5}) = 0.201413."""
    assert math.isclose(losses.simpo_loss(t(-1.0), t(-2.0), 2.0, 0.5).losses.item(), 0.20141327798275246,
                        rel_tol=1e-12)


def test_npo_by_hand():
    """δ = −3 − (−2) = −1, β = 0.1: −(2/0.1)·log σ(−β·δ) = −20·log σ(0.1) = 20·log(1 + e^{−0.1}) = 12.88793."""
    assert math.isclose(losses.npo_loss(t(-3.0), t(-2.0), 0.1).item(), 20 * 0.6443966600735709, rel_tol=1e-12)


def test_token_weights_modes():
    p = t(0.2, 0.7, 0.5)
    assert losses.token_weights(p, "indicator").tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(losses.token_weights(p, "soft"), t(0.8, 0.3, 0.5))
    assert torch.equal(losses.token_weights(p, "raw"), p)


def test_token_npo_by_hand():
    """δ = [0, 1, −2], w = [1, 0, 1], β = 1: −(log σ(0) + log σ(2)) / 2 = (0.693147 + 0.126928)/2 = 0.410038.
    The middle token has w = 0: it neither counts in the normaliser nor contributes."""
    policy, ref = t(-1.0, -1.0, -3.0).unsqueeze(0), t(-1.0, -2.0, -1.0).unsqueeze(0)
    w, mask = t(1.0, 0.0, 1.0).unsqueeze(0), torch.ones(1, 3, dtype=torch.bool)
    loss = losses.token_npo_loss(policy, ref, w, mask, beta=1.0)
    assert math.isclose(loss.item(), (math.log(2) + softplus(2.0)) / 2, rel_tol=1e-12)
    # padding (mask False) is ignored even when a weight sits there; no weighted token gives 0, not NaN
    mask[0, 2] = False
    assert math.isclose(losses.token_npo_loss(policy, ref, w, mask, 1.0).item(), math.log(2), rel_tol=1e-12)
    assert losses.token_npo_loss(policy, ref, torch.zeros_like(w), mask, 1.0).item() == 0.0


REJ = [0.5, -1.0, 0.2, -3.0, 0.4, 0.1, 0.0, 0.3, 0.6, 0.7]  # δ^l of a 10-token rejected response


def _improve_case(width: int = 12, k_basis: str = "response", noise_side: str = "rejected", eps: float = 0.2):
    d_l = torch.zeros(1, width, dtype=D)
    d_l[0, 2:12] = t(*REJ)
    m_l = torch.zeros(1, width, dtype=torch.bool)
    m_l[0, 2:12] = True
    d_w = torch.zeros(1, width, dtype=D)
    d_w[0, 2:7] = t(0.1, 0.2, 0.9, -0.4, 0.3)
    m_w = torch.zeros(1, width, dtype=torch.bool)
    m_w[0, 2:7] = True
    zeros = torch.zeros(1, width, dtype=D)
    return losses.noise_masked_dpo_loss(d_w, d_l, zeros, zeros, m_w, m_l, 0.1, eps, k_basis, noise_side)


def test_noise_masked_dpo_rejected_side_by_hand():
    """ε = 0.2, L = 10 → K = 2: keep δ^l = −3 and −1 (sum −4). Chosen sum 0.1+0.2+0.9−0.4+0.3 = 1.1.
    loss = −log σ(0.1·(1.1 + 4)) = log(1 + e^{−0.51})."""
    out = _improve_case()
    assert math.isclose(out.losses.item(), softplus(0.51), rel_tol=1e-12)
    assert out.rejected_weights[0].nonzero().flatten().tolist() == [3, 5]
    assert out.chosen_weights.sum().item() == 5


def test_noise_masked_dpo_padded_basis():
    """k_basis padded (reference code): L = padded width 20 → K = 4: keep −3, −1, 0, 0.1 (sum −3.9)."""
    out = _improve_case(width=20, k_basis="padded")
    assert math.isclose(out.losses.item(), softplus(0.1 * (1.1 + 3.9)), rel_tol=1e-12)


def test_noise_masked_dpo_both_sides():
    """noise_side both: chosen drops its top ⌊0.2·5⌋ = 1 token (0.9): sum 0.2; rejected as before (−4)."""
    out = _improve_case(noise_side="both")
    assert math.isclose(out.losses.item(), softplus(0.1 * (0.2 + 4)), rel_tol=1e-12)


def test_noise_masked_dpo_is_dpo_at_step0():
    """All δ = 0 (policy == reference): every token is kept on both sides and the loss is ln 2, as plain DPO."""
    m = torch.ones(2, 7, dtype=torch.bool)
    lp = -torch.rand(2, 7, dtype=D)
    for side in ("rejected", "both"):
        out = losses.noise_masked_dpo_loss(lp, lp, lp, lp, m, m, 0.1, 0.1, "response", side)
        assert torch.allclose(out.losses, torch.full((2,), math.log(2), dtype=D))
        assert out.rejected_weights.all() and out.chosen_weights.all()


def test_noise_mask_gradient_flows_only_through_kept_tokens():
    pol = torch.zeros(1, 12, dtype=D, requires_grad=True)
    d_l = torch.zeros(1, 12, dtype=D)
    d_l[0, 2:12] = t(*REJ)
    m = torch.zeros(1, 12, dtype=torch.bool)
    m[0, 2:12] = True
    ref = -d_l  # policy 0 − ref = δ
    out = losses.noise_masked_dpo_loss(pol.detach(), pol, pol.detach(), ref, m, m, 0.1, 0.2)
    out.losses.sum().backward()
    assert pol.grad[0].nonzero().flatten().tolist() == [3, 5]


def test_dpo_plus_nll_by_hand():
    """dpo.nll_weight / improve.nll_weight add w · mean over pairs of the chosen responses' token-mean NLL; 0 leaves
    the loss as it was. One pair with 2 chosen tokens (log-probs -1, -3), one with 1 (-2): NLL 2 and 2, mean 2."""
    from allo.config import DPOConfig, ImproveConfig
    from allo.stages.objectives import improve, preference

    labels = torch.tensor([[-100, 5, 6], [-100, 7, -100], [-100, 8, 9], [-100, 4, -100]])  # chosen ×2, rejected ×2
    logps = torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0], [0.0, -1.5, -0.5], [0.0, -2.5, 0.0]])
    batch = {"labels": labels, "ref_logps": torch.full_like(logps, -1.0)}
    for make, cfg in ((preference, DPOConfig), (improve, ImproveConfig)):
        plain, metrics = make(cfg())(logps, batch)
        assert "nll/chosen" not in metrics
        loss, metrics = make(cfg(nll_weight=0.5))(logps, batch)
        assert math.isclose(float(loss), float(plain) + 0.5 * 2.0, rel_tol=1e-6)
        assert torch.allclose(metrics["nll/chosen"], torch.tensor([2.0, 2.0]))


def test_uniform_token_weights_weigh_every_token_alike():
    """The "without token reward" control: w = 1 whatever the reward model says, so the token NPO loss is the mean
    of −log σ(−β δ) over every response token (hand-computed on two tokens)."""
    import math

    import pytest

    from allo.losses import token_npo_loss, token_weights

    keep = torch.tensor([[0.9, 0.1, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = token_weights(keep, "uniform") * mask
    assert w.tolist() == [[1.0, 1.0, 0.0]]
    policy, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, -3.0]])
    beta = 0.1
    want = -(math.log(1 / (1 + math.exp(beta * 0.5))) + math.log(1 / (1 + math.exp(beta * -1.0)))) / 2
    assert token_npo_loss(policy, ref, w, mask, beta).item() == pytest.approx(want, rel=1e-6)
