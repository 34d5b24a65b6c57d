"""lr schedules vs hand-computed NeMo 1.14 / NxDT values, and the torch scheduler built on them."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from recipe_runner.train.schedulers import (
    SCHEDULERS, build_scheduler, lr_at, required_params, scheduler_params,
)

COS = lambda x: 0.5 * (1 + math.cos(math.pi * x))  # noqa: E731

# (name, params, base_lr, {step: expected lr}); steps cover 0, warmup-1, warmup, warmup+1, mid, max, beyond.
CASES = [
    # NxDT: transformers' linear schedule; lr 0 at step 0, peak exactly at step == warmup_steps.
    ("LinearAnnealingWithWarmUp", dict(warmup_steps=10, max_steps=100), 1.0,
     {0: 0.0, 1: 0.1, 9: 0.9, 10: 1.0, 11: 89 / 90, 55: 0.5, 100: 0.0, 120: 0.0}),
    # NeMo warmup: (step+1)/(warmup+1) through step == warmup; min_lr only strictly after max_steps.
    ("WarmupPolicy", dict(warmup_steps=4, max_steps=10, min_lr=0.01), 1.0,
     {0: 0.2, 3: 0.8, 4: 1.0, 5: 1.0, 7: 1.0, 10: 1.0, 11: 0.01}),
    ("WarmupPolicy", dict(warmup_ratio=0.45, max_steps=10), 1.0,  # int(0.45 * 10) = 4
     {0: 0.2, 4: 1.0, 11: 0.0}),
    ("WarmupPolicy", dict(), 0.3, {0: 0.3, 10**6: 0.3}),  # no warmup, no max_steps: constant
    ("WarmupHoldPolicy", dict(warmup_steps=2, hold_steps=3, max_steps=10, min_lr=0.1), 1.0,
     {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 10: 1.0, 11: 0.1}),
    ("CosineAnnealing", dict(warmup_steps=4, max_steps=12, min_lr=0.1), 1.1,
     {0: 0.22, 3: 0.88, 4: 1.1, 5: 0.1 + COS(1 / 8), 8: 0.6, 11: 0.1 + COS(7 / 8), 12: 0.1, 13: 0.1}),
    ("CosineAnnealing", dict(warmup_steps=10, max_steps=100), 1.0,  # the ORPO recipe's shape
     {0: 1 / 11, 9: 10 / 11, 10: 1.0, 11: COS(1 / 90), 55: 0.5, 100: 0.0, 101: 0.0}),
    # constant_steps > 0: Megatron curve; warmup step/warmup (0 at step 0), cosine over
    # max - warmup - constant = 6 steps, then min_lr.
    ("CosineAnnealing", dict(warmup_steps=4, constant_steps=2, max_steps=12, min_lr=0.1), 1.1,
     {0: 0.0, 3: 0.825, 4: 1.1, 5: 0.1 + COS(1 / 6), 7: 0.6, 10: 0.1, 11: 0.1, 12: 0.1, 13: 0.1}),
    ("WarmupAnnealing", dict(warmup_steps=2, max_steps=10, min_lr=0.2), 1.0,
     {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 0.9, 6: 0.6, 10: 0.2, 11: 0.2}),
    # SquareAnnealing's NeMo default min_lr is 1e-5, and it clamps instead of annealing to it.
    ("SquareAnnealing", dict(warmup_steps=2, max_steps=10), 1.0,
     {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 0.765625, 6: 0.25, 10: 1e-5, 11: 1e-5}),
    # SquareRootAnnealing ignores warmup in its curve: sqrt((max - step) / max).
    ("SquareRootAnnealing", dict(warmup_steps=2, max_steps=10), 1.0,
     {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: math.sqrt(0.7), 6: math.sqrt(0.4), 10: 0.0, 11: 0.0}),
    ("InverseSquareRootAnnealing", dict(warmup_steps=3, max_steps=20), 1.0,
     {0: 0.25, 2: 0.75, 3: 1.0, 4: math.sqrt(4 / 5), 15: 0.5, 20: math.sqrt(4 / 21), 21: 0.0}),
    ("PolynomialDecayAnnealing", dict(warmup_steps=2, max_steps=10, power=2.0, min_lr=0.1), 1.0,
     {0: 1 / 3, 2: 1.0, 3: 0.1 + 0.9 * (7 / 8) ** 2, 6: 0.325, 10: 0.1, 11: 0.1}),
    # Noam: d_model**-0.5 * min(s**-0.5, s * w**-1.5), s = max(1, step); min_lr only after warmup;
    # no cutoff at max_steps. d_model 16 -> 0.25; w = 4 -> w**-1.5 = 0.125.
    ("NoamAnnealing", dict(d_model=16, warmup_steps=4, max_steps=50, min_lr=0.1), 2.0,
     {0: 0.0625, 1: 0.0625, 3: 0.1875, 4: 0.25, 5: 0.5 / math.sqrt(5), 50: 0.1, 100: 0.1}),
    ("NoamAnnealing", dict(d_model=16, warmup_steps=4, max_steps=50), 2.0, {100: 0.05}),
    ("NoamAnnealing", dict(d_model=4), 1.0, {0: 0.5, 4: 0.25}),  # no warmup: pure step**-0.5
    ("StepLR", dict(step_size=3, gamma=0.5), 1.0, {0: 1.0, 2: 1.0, 3: 0.5, 5: 0.5, 6: 0.25}),
    ("StepLR", dict(step_size=3, max_steps=100), 1.0, {3: 0.1}),  # NeMo default gamma 0.1; max_steps ignored
    ("ExponentialLR", dict(gamma=0.9), 1.0, {0: 1.0, 1: 0.9, 2: 0.81}),
]


@pytest.mark.parametrize("name,params,base,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_lr_at_hand_computed(name, params, base, expected):
    got = {s: lr_at(name, s, base, **params) for s in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_every_name_has_a_case():
    assert {c[0] for c in CASES} == set(SCHEDULERS)


def test_linear_matches_transformers():
    # NxDT builds exactly this LambdaLR; compare with transformers' public equivalent.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=30)
    for step in range(35):
        assert lr_at("LinearAnnealingWithWarmUp", step, 0.5, warmup_steps=7, max_steps=30) == pytest.approx(
            ref.get_last_lr()[0], abs=1e-15)
        opt.step()
        ref.step()


RUNS = [(c[0], c[1]) for c in CASES if c[1].get("max_steps") or c[0] in ("StepLR", "ExponentialLR")]


def _optimizer():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    return torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], lr=1.0)


def _run(opt, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs += [g["lr"] for g in opt.param_groups]  # the lrs this optimizer step uses
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name,params", RUNS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RUNS)])
def test_build_scheduler_follows_lr_at(name, params):
    opt = _optimizer()
    lrs = _run(opt, build_scheduler(opt, name, **params), 25)
    want = [lr_at(name, k, base, **params) for k in range(25) for base in (1.0, 0.5)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name,params,torch_cls", [
    ("StepLR", dict(step_size=3, gamma=0.5), torch.optim.lr_scheduler.StepLR),
    ("ExponentialLR", dict(gamma=0.9), torch.optim.lr_scheduler.ExponentialLR),
])
def test_torch_schedulers_match_torch(name, params, torch_cls):
    ours, theirs = _optimizer(), _optimizer()
    assert _run(ours, build_scheduler(ours, name, **params), 12) == pytest.approx(
        _run(theirs, torch_cls(theirs, **params), 12), rel=1e-12)


def test_state_dict_round_trip_continues_identically():
    params = dict(warmup_steps=3, max_steps=20, min_lr=0.01)
    opt = _optimizer()
    sched = build_scheduler(opt, "CosineAnnealing", **params)
    full = _run(opt, sched, 7)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    full += _run(opt, sched, 10)

    opt2 = _optimizer()  # a fresh process: build, then load (either order works)
    sched2 = build_scheduler(opt2, "CosineAnnealing", **params)
    sched2.load_state_dict(sched_state)
    opt2.load_state_dict(opt_state)
    assert _run(opt2, sched2, 10) == pytest.approx(full[14:], rel=1e-12)


def test_resume_keeps_current_recipe_shape():
    opt = _optimizer()
    sched = build_scheduler(opt, "LinearAnnealingWithWarmUp", warmup_steps=2, max_steps=10)
    _run(opt, sched, 5)
    opt2 = _optimizer()
    sched2 = build_scheduler(opt2, "LinearAnnealingWithWarmUp", warmup_steps=2, max_steps=20)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 5
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(
        [lr_at("LinearAnnealingWithWarmUp", 5, b, warmup_steps=2, max_steps=20) for b in (1.0, 0.5)])


def test_rprop_is_an_optimizer():
    with pytest.raises(ValueError, match="optimizer in NeMo"):
        lr_at("rprop", 0, 1.0)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Did you mean 'CosineAnnealing'") as e:
        scheduler_params("CosineAnealing")
    assert all(n in str(e.value) for n in SCHEDULERS)


@pytest.mark.parametrize("name,params,key", [
    ("CosineAnnealing", dict(warmup_steps=1), "max_steps"),
    ("LinearAnnealingWithWarmUp", dict(max_steps=10), "warmup_steps"),
    ("NoamAnnealing", dict(warmup_steps=10), "d_model"),
    ("StepLR", dict(), "step_size"),
    ("ExponentialLR", dict(), "gamma"),
    ("WarmupPolicy", dict(warmup_ratio=0.1), "max_steps"),
])
def test_missing_params_named(name, params, key):
    assert key in required_params(name) or key == "max_steps"
    with pytest.raises(ValueError, match=key):
        lr_at(name, 0, 1.0, **params)


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="warmup_step\\b.*accepted keys"):
        lr_at("CosineAnnealing", 0, 1.0, warmup_step=3, max_steps=10)
    with pytest.raises(ValueError, match="either warmup_steps or warmup_ratio"):
        lr_at("CosineAnnealing", 0, 1.0, warmup_steps=3, warmup_ratio=0.1, max_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at("CosineAnnealing", 5, 1e-4, max_steps=10, min_lr=1e-3)


def test_scheduler_params_defaults_are_nemo_defaults():
    assert scheduler_params("SquareAnnealing")["min_lr"] == 1e-5
    assert scheduler_params("StepLR")["gamma"] == 0.1
    assert set(scheduler_params("CosineAnnealing")) == {
        "warmup_steps", "warmup_ratio", "max_steps", "min_lr", "constant_steps", "constant_ratio"}


def test_build_scheduler_fails_before_touching_optimizer():
    opt = _optimizer()
    with pytest.raises(ValueError, match="max_steps"):
        build_scheduler(opt, "CosineAnnealing", warmup_steps=2)
    assert "initial_lr" not in opt.param_groups[0]
