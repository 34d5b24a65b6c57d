"""Learning-rate schedules under the names NxDT recipes use (`model.optim.sched.name`).

NxDT pins nemo_toolkit 1.14 and builds schedulers with NeMo's `prepare_lr_scheduler`, so these
follow nemo/core/optim/lr_scheduler.py of NeMo 1.14 (same through 1.23 but for ExponentialLR's
interval) plus NxDT's `LinearAnnealingWithWarmUp`. Users overlay our lr curve on an NxDT run's, so
off-by-ones, defaults and quirks are kept. `step` counts optimizer steps already taken (torch's
`last_epoch`): the first optimizer step runs at `lr_at(name, 0, ...)`.
"""

from __future__ import annotations

import difflib
import math

from torch.optim.lr_scheduler import LRScheduler

_W = {"warmup_steps": None, "warmup_ratio": None, "max_steps": None}
_PARAMS: dict[str, dict[str, object]] = {
    # NxDT: LambdaLR(transformers' linear-with-warmup lambda); both keys are required there.
    "LinearAnnealingWithWarmUp": {"warmup_steps": None, "max_steps": None},
    "CosineAnnealing": {**_W, "constant_steps": None, "constant_ratio": None, "min_lr": 0.0},
    "WarmupPolicy": {**_W, "min_lr": 0.0},
    "WarmupHoldPolicy": {**_W, "hold_steps": None, "hold_ratio": None, "min_lr": 0.0},
    "WarmupAnnealing": {**_W, "min_lr": 0.0},
    "SquareAnnealing": {**_W, "min_lr": 1e-5},  # NeMo's default min_lr for this one is 1e-5
    "SquareRootAnnealing": {**_W, "min_lr": 0.0},
    "InverseSquareRootAnnealing": {**_W, "min_lr": 0.0},
    "PolynomialDecayAnnealing": {**_W, "min_lr": 0.0, "power": 1.0, "cycle": False},
    "NoamAnnealing": {"d_model": None, **_W, "min_lr": 0.0},
    # torch's own; NeMo injects max_steps into every sched config and drops it for these.
    "StepLR": {"step_size": None, "gamma": 0.1, "max_steps": None},
    "ExponentialLR": {"gamma": None, "max_steps": None},
}
SCHEDULERS: tuple[str, ...] = tuple(_PARAMS)
# Keys without a default in the NeMo/NxDT constructor signatures.
_NO_MAX = ("WarmupPolicy", "WarmupHoldPolicy", "NoamAnnealing", "StepLR", "ExponentialLR")
_REQUIRED = {n: ("max_steps",) for n in SCHEDULERS if n not in _NO_MAX}
_REQUIRED.update(LinearAnnealingWithWarmUp=("warmup_steps", "max_steps"), NoamAnnealing=("d_model",),
                 StepLR=("step_size",), ExponentialLR=("gamma",))


def _check_name(name: str) -> None:
    if name in _PARAMS:
        return
    if name.lower() == "rprop":
        raise ValueError("'rprop' is an optimizer in NeMo (torch.optim.Rprop), not a learning-rate "
                         f"scheduler, although the NxDT docs list it; choose one of: {', '.join(SCHEDULERS)}")
    close = difflib.get_close_matches(name, SCHEDULERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown scheduler '{name}'.{hint} Valid names: {', '.join(SCHEDULERS)}")


def scheduler_params(name: str) -> dict[str, object]:
    """The keys `name` accepts with their defaults (None: unset; see `required_params`)."""
    _check_name(name)
    return dict(_PARAMS[name])


def required_params(name: str) -> tuple[str, ...]:
    """Keys that must be given (not None) for `name`."""
    _check_name(name)
    return _REQUIRED.get(name, ())


def _steps(p: dict, key: str) -> int:
    """NeMo's `<key>_steps` or int(`<key>_ratio` * max_steps) or 0; giving both is an error."""
    steps, ratio = p.get(f"{key}_steps"), p.get(f"{key}_ratio")
    if steps is not None and ratio is not None:
        raise ValueError(f"give either {key}_steps or {key}_ratio, not both")
    if ratio is not None and p["max_steps"] is None:
        raise ValueError(f"{key}_ratio needs max_steps")
    return steps if steps is not None else int(ratio * p["max_steps"]) if ratio is not None else 0


def _resolve(name: str, params: dict) -> dict:
    _check_name(name)
    unknown = sorted(set(params) - set(_PARAMS[name]))
    if unknown:
        raise ValueError(f"scheduler {name} does not accept {', '.join(unknown)}; "
                         f"accepted keys: {', '.join(_PARAMS[name])}")
    p = {**_PARAMS[name], **params}
    for key in _REQUIRED.get(name, ()):
        if p[key] is None:
            raise ValueError(f"scheduler {name} requires '{key}'")
    if "warmup_ratio" in p:
        p["w"] = _steps(p, "warmup")
    if "hold_steps" in p:  # WarmupHoldPolicy counts hold steps from step 0, i.e. warmup included
        held = p["hold_steps"] is not None or p["hold_ratio"] is not None
        p["hold"] = _steps(p, "hold") + p["w"] if held else 0
    if "constant_steps" in p:
        p["c"] = _steps(p, "constant")
    return p


def _poly(base: float, step: int, decay: int, power: float, lo: float, cycle: bool) -> float:
    if cycle:  # NeMo `_poly_decay`
        decay *= 1.0 if step == 0 else math.ceil(step / decay)
    else:
        step = min(step, decay)
    return (base - lo) * (1.0 - step / decay) ** power + lo


def _cosine(s: int, base: float, p: dict) -> float:
    """NeMo CosineAnnealing. With constant_steps > 0 it switches to Megatron's curve: warmup base*s/w
    (lr 0 at step 0), cosine over max-warmup-constant steps, then min_lr for the constant steps."""
    w, mx, lo = p["w"], p["max_steps"], p["min_lr"]
    if base < lo or (p["c"] > 0 and base == lo):
        raise ValueError(f"CosineAnnealing: lr {base} must be above min_lr {lo}")
    if p["c"] == 0:
        if w > 0 and s <= w:
            return base * (s + 1) / (w + 1)
        if s > mx:
            return lo
        return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * (s - w) / (mx - w)))
    decay = mx - p["c"] - w
    if w > 0 and s <= w:
        return base * s / w
    if s > w + decay:
        return lo
    return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * (s - w) / decay))


def _noam(s: int, base: float, p: dict) -> float:
    """NeMo NoamAnnealing: step 0 counts as 1; min_lr only applies after warmup; no max_steps cutoff."""
    w, lo = p["w"], p["min_lr"]
    if base < lo:
        raise ValueError(f"NoamAnnealing: lr {base} is below min_lr {lo}")
    s = max(1, s)
    mult = p["d_model"] ** -0.5 * (min(s ** -0.5, s * w ** -1.5) if w > 0 else s ** -0.5)
    return max(base * mult, lo) if s > w else base * mult


def _linear(s: int, base: float, p: dict) -> float:
    """NxDT LinearAnnealingWithWarmUp = transformers' linear schedule: 0 at step 0, peak at warmup_steps."""
    w, mx = p["warmup_steps"], p["max_steps"]
    if s < w:
        return base * s / max(1, w)
    return base * max(0.0, (mx - s) / max(1, mx - w))


def _tail(name: str, s: int, b: float, p: dict) -> float:
    """The curves of NeMo's WarmupPolicy subclasses, used after warmup (and hold) up to max_steps."""
    w, mx, lo = p["w"], p["max_steps"], p["min_lr"]
    if name == "WarmupAnnealing":  # NeMo uses base_lrs[0] for all groups; we use each group's lr
        return lo + (1 - (s - w) / (mx - w)) * (b - lo)
    if name == "SquareAnnealing":  # clamped at min_lr, not annealed towards it
        return max(b * ((mx - s) / (mx - w)) ** 2, lo)
    if name == "SquareRootAnnealing":  # NeMo does NOT offset by warmup: the lr drops right after it
        return max(b * ((mx - s) / mx) ** 0.5, lo)
    if name == "InverseSquareRootAnnealing":
        return b / ((s + 1) / (w + 1)) ** 0.5
    if name == "PolynomialDecayAnnealing":
        return _poly(b, s - w, mx - w, p["power"], lo, p["cycle"])
    return b  # WarmupPolicy, WarmupHoldPolicy: constant


_WARMUP_FAMILY = ("WarmupPolicy", "WarmupHoldPolicy", "WarmupAnnealing", "SquareAnnealing",
                  "SquareRootAnnealing", "InverseSquareRootAnnealing", "PolynomialDecayAnnealing")


def lr_at(name: str, step: int, base_lr: float, **params) -> float:
    """The lr scheduler `name` gives after `step` optimizer steps, for a param group whose lr is `base_lr`."""
    p = _resolve(name, params)
    if name in _WARMUP_FAMILY:
        # NeMo WarmupPolicy.get_lr: warmup (step+1)/(w+1) up to and including step w, hold
        # (WarmupHoldPolicy family), min_lr strictly after max_steps, else the scheduler's curve.
        w, mx = p["w"], p["max_steps"]
        if w > 0 and step <= w:
            return base_lr * (step + 1) / (w + 1)
        if "hold" in p and w <= step < p["hold"]:
            return base_lr
        if mx is not None and step > mx:
            return p["min_lr"]
        return _tail(name, step, base_lr, p)
    if name == "StepLR":  # torch's closed form
        return base_lr * p["gamma"] ** (step // p["step_size"])
    if name == "ExponentialLR":  # torch's, stepped per optimizer step as in NeMo 1.14 (per epoch from 1.20)
        return base_lr * p["gamma"] ** step
    curve = {"CosineAnnealing": _cosine, "NoamAnnealing": _noam, "LinearAnnealingWithWarmUp": _linear}[name]
    return curve(step, base_lr, p)


class NamedScheduler(LRScheduler):
    """`lr_at` for every param group. load_state_dict restores progress only; name, params and base lrs
    stay the current recipe's, so a resume can extend max_steps (torch/NeMo keep the checkpoint's)."""

    def __init__(self, optimizer, name: str, **params):
        _resolve(name, params)  # fail on bad params before touching the optimizer
        self.name, self.params = name, dict(params)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.name, self.last_epoch, b, **self.params) for b in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def build_scheduler(optimizer, name: str, **params) -> LRScheduler:
    """A torch scheduler for `name`; call `.step()` once after every optimizer step."""
    return NamedScheduler(optimizer, name, **params)
