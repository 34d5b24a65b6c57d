"""DPO/ORPO losses: closed forms, numerical stability at extreme log-probs, and parity with TRL
1.16 (test-only dependency; its DPO loss is inlined in DPOTrainer._compute_loss, which is driven
here with a stub trainer and a stub model that returns hand-built per-token log-probs)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from recipe_runner.model.losses import dpo_loss, log1mexp, orpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ATOL, RTOL = 1e-5, 5e-4


def _logsigmoid64(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _log1mexp64(x: float) -> float:
    """float64 reference; log(-expm1(x)) alone rounds to 0 below about -37."""
    return math.log(-math.expm1(x)) if x > -1.0 else math.log1p(-math.exp(x))


# ----------------------------------------------------------------------------- closed forms
def test_dpo_sigmoid_closed_form_torchtune_style():
    # log-ratio differences 0, 10, 20 with beta 0.1 -> -logsigmoid([0, 1, 2])
    pc = torch.tensor([-5.0, -5.0, -5.0])
    pr = torch.tensor([-5.0, -15.0, -25.0])
    ref = torch.full((3,), -5.0)
    out = dpo_loss(pc, pr, ref, ref, beta=0.1)
    torch.testing.assert_close(out["loss"], -F.logsigmoid(torch.tensor([0.0, 1.0, 2.0])))
    assert out["loss"][0].item() == pytest.approx(math.log(2), abs=1e-7)
    torch.testing.assert_close(out["chosen_rewards"], torch.zeros(3))
    torch.testing.assert_close(out["rejected_rewards"], torch.tensor([0.0, -1.0, -2.0]))
    assert not out["chosen_rewards"].requires_grad


def test_dpo_sigmoid_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-12.3, -0.5, -300.0])
    out = dpo_loss(logps, logps - 7, logps, logps - 7, beta=0.37)
    torch.testing.assert_close(out["loss"], torch.full((3,), math.log(2)))
    assert (out["chosen_rewards"] > out["rejected_rewards"]).float().mean().item() == 0.0


def test_dpo_hinge_closed_form():
    d = torch.tensor([-5.0, 0.0, 5.0, 10.0, 20.0])
    out = dpo_loss(d, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=0.1, loss_type="hinge")
    torch.testing.assert_close(out["loss"], torch.tensor([1.5, 1.0, 0.5, 0.0, 0.0]))


def test_dpo_ipo_closed_form_with_lengths():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -9.0])
    rc, rr = torch.tensor([-11.0, -6.0]), torch.tensor([-10.0, -3.0])
    lc, lr = torch.tensor([4.0, 2.0]), torch.tensor([5.0, 3.0])
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    expect = [((-10 + 11) / 4 - (-12 + 10) / 5 - 1 / (2 * beta)) ** 2,
              ((-4 + 6) / 2 - (-9 + 3) / 3 - 1 / (2 * beta)) ** 2]
    torch.testing.assert_close(out["loss"], torch.tensor(expect))
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="kto")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_conservative_label_smoothing_closed_form(eps):
    d = [-3.0, 0.0, 2.5, 40.0]
    beta = 0.2
    out = dpo_loss(torch.tensor(d), torch.zeros(4), torch.zeros(4), torch.zeros(4), beta=beta,
                   label_smoothing=eps)
    expect = [-(1 - eps) * _logsigmoid64(beta * x) - eps * _logsigmoid64(-beta * x) for x in d]
    torch.testing.assert_close(out["loss"], torch.tensor(expect, dtype=torch.float32))
    if eps:  # a smoothed loss does not go to 0 for a huge margin: it grows again (cDPO)
        assert out["loss"][3].item() > out["loss"][2].item() - 1.0 and out["loss"][3].item() > 0.5


def test_orpo_against_float64_hand_computation():
    lc = [-0.05, -0.7, -1.3, -2.0, -1e-6, -8.0]
    lr = [-0.9, -0.6, -3.1, -2.0, -5e-4, -0.01]
    nll = [0.3, 1.1, 2.0, 0.0, 4.2, 0.7]
    beta = 0.25
    out = orpo_loss(torch.tensor(lc), torch.tensor(lr), torch.tensor(nll), beta=beta)
    odds = [(c - r) - (_log1mexp64(c) - _log1mexp64(r)) for c, r in zip(lc, lr)]
    loss = [n - beta * _logsigmoid64(o) for n, o in zip(nll, odds)]
    torch.testing.assert_close(out["log_odds_chosen"], torch.tensor(odds), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["log_odds_ratio"], torch.tensor([_logsigmoid64(o) for o in odds]),
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["loss"], torch.tensor(loss), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["chosen_rewards"], beta * torch.tensor(lc))
    torch.testing.assert_close(out["rejected_rewards"], beta * torch.tensor(lr))
    torch.testing.assert_close(out["nll_loss"], torch.tensor(nll))
    # equal means -> log-odds 0 -> ratio term ln 2 (the ORPO analogue of DPO's first step)
    assert out["log_odds_chosen"][3].item() == pytest.approx(0.0, abs=1e-7)
    assert out["log_odds_ratio"][3].item() == pytest.approx(-math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------- stability
EXTREME = [-1e-9, -1e-3, -0.69, -math.log(2), -0.70, -1.0, -50.0, -1e4]


def test_log1mexp_accurate_and_finite_on_extreme_inputs():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(EXTREME, dtype=dtype, requires_grad=True)
        y = log1mexp(x)
        assert torch.isfinite(y).all(), y
        expect = torch.tensor([_log1mexp64(v) for v in EXTREME], dtype=torch.float64)
        # relative accuracy where the value is not tiny; absolute where it underflows towards 0
        torch.testing.assert_close(y.double(), expect, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=1e-30)
        y.sum().backward()
        assert torch.isfinite(x.grad).all(), x.grad
        grad = torch.tensor([-math.exp(v) / -math.expm1(v) for v in EXTREME], dtype=torch.float64)
        torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-30)


def test_log1mexp_at_zero_is_finite_with_finite_gradient():
    # fp32 rounds a log-prob of a near-certain token to exactly 0: must not give -inf / NaN
    x = torch.zeros(3, requires_grad=True)
    y = log1mexp(x)
    assert torch.isfinite(y).all() and (y < -80).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_finite_for_extreme_logps(loss_type):
    vals = torch.tensor([-1e4, -1e-8, -1e4, -1e-8, 0.0])
    pc = vals.clone().requires_grad_(True)
    pr = vals.flip(0).clone().requires_grad_(True)
    out = dpo_loss(pc, pr, vals.roll(1), vals.roll(2), beta=0.1, loss_type=loss_type, label_smoothing=0.0,
                   chosen_lengths=torch.full((5,), 3.0), rejected_lengths=torch.full((5,), 4000.0))
    assert torch.isfinite(out["loss"]).all()
    out["loss"].sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_orpo_finite_for_extreme_logps():
    lc = torch.tensor([-1e4, -1e-8, -1e4, -1e-8, 0.0, -1e-9], requires_grad=True)
    lr = torch.tensor([-1e-8, -1e4, -1e4, -1e-8, 0.0, -30.0], requires_grad=True)
    out = orpo_loss(lc, lr, -lc, beta=0.1)
    for k in ("loss", "log_odds_ratio", "log_odds_chosen"):
        assert torch.isfinite(out[k]).all(), (k, out[k])
    out["loss"].sum().backward()
    assert torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()


# ----------------------------------------------------------------------------- TRL parity
class _StubModel:
    """Stands in for the policy under TRL's fused LM head: returns fixed per-token log-probs."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor):
        self.out = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros_like(per_token_logps),
                                   mean_logits=torch.zeros_like(per_token_logps),
                                   is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool))

    def __call__(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        return self.out


def _trl_dpo(pc, pr, rc, rr, lc, lr, *, beta, loss_type):
    """TRL's DPO loss (mean over pairs) and logged metrics for given summed log-probs/lengths."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b = len(pc)
    t = int(max(lc.max(), lr.max())) + 2
    lengths = torch.cat([lc, lr]).long()
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    per_token = torch.zeros(2 * b, t - 1)
    sums = torch.cat([pc, pr])
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1:1 + n] = 1  # token 0 is the prompt
        per_token[i, :n] = sums[i] / n  # shifted: position j scores token j+1
    model = _StubModel(per_token)
    stub = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                                 gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * b, t, dtype=torch.long), "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trl(loss_type):
    g = torch.Generator().manual_seed(7)
    b = 11
    pc, pr = -torch.rand(b, generator=g) * 60, -torch.rand(b, generator=g) * 60
    rc, rr = pc + torch.randn(b, generator=g) * 3, pr + torch.randn(b, generator=g) * 3
    lc = torch.randint(1, 40, (b,), generator=g).float()
    lr = torch.randint(1, 40, (b,), generator=g).float()
    beta = 0.1 if loss_type != "ipo" else 0.5
    ours = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    trl_loss, m = _trl_dpo(pc, pr, rc, rr, lc, lr, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(ours["loss"].mean(), trl_loss, atol=ATOL, rtol=RTOL)
    assert ours["chosen_rewards"].mean().item() == pytest.approx(m["rewards/chosen"], abs=ATOL, rel=RTOL)
    assert ours["rejected_rewards"].mean().item() == pytest.approx(m["rewards/rejected"], abs=ATOL, rel=RTOL)
    margin = (ours["chosen_rewards"] - ours["rejected_rewards"]).mean().item()
    assert margin == pytest.approx(m["rewards/margins"], abs=ATOL, rel=RTOL)
    acc = (ours["chosen_rewards"] > ours["rejected_rewards"]).float().mean().item()
    assert acc == pytest.approx(m["rewards/accuracies"])
    assert 0 < acc < 1  # the data exercises both outcomes


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    g = torch.Generator().manual_seed(3)
    b = 13
    lc = -torch.rand(b, generator=g) * 3 - 1e-3
    lr = -torch.rand(b, generator=g) * 3 - 1e-3
    nll = torch.rand(b, generator=g) * 2
    beta = 0.1
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr, ratio_mean, odds_mean = ORPOTrainer.odds_ratio_loss(stub, lc, lr)
    ours = orpo_loss(lc, lr, nll, beta=beta)
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); ours per pair, averaged by the caller
    torch.testing.assert_close(ours["loss"], nll - losses, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours["loss"].mean(), nll.mean() - losses.mean(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours["chosen_rewards"], cr)
    torch.testing.assert_close(ours["rejected_rewards"], rr)
    torch.testing.assert_close(ours["log_odds_ratio"].mean(), ratio_mean, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours["log_odds_chosen"].mean(), odds_mean, atol=ATOL, rtol=RTOL)
    x = torch.tensor([-1e-3, -0.5, -0.69, -0.7, -1.0, -5.0, -50.0])
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x), atol=ATOL, rtol=1e-6)
