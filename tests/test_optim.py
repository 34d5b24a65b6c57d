"""Weight-decay grouping and the AdamW update vs hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recipe_runner.train.optim import OPTIMIZERS, NxdtAdamW, build_optimizer, param_groups


class CustomRMSNorm(torch.nn.Module):  # found by class name, though its attribute is called "scale"
    def __init__(self, n):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)  # weight decayed, bias not
        self.ln = torch.nn.LayerNorm(3)  # weight and bias: not decayed
        self.gain = CustomRMSNorm(3)
        self.head = torch.nn.Linear(3, 2, bias=False)


def _ids(group):
    return {id(p) for p in group["params"]}


def test_norms_and_biases_not_decayed():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert _ids(decay) == {id(m.proj.weight), id(m.head.weight)}
    assert _ids(no_decay) == {id(m.proj.bias), id(m.ln.weight), id(m.ln.bias), id(m.gain.scale)}


def test_exclude_norm_weights_false_still_excludes_biases():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.1, exclude_norm_weights=False)
    assert _ids(no_decay) == {id(m.proj.bias), id(m.ln.bias)}
    assert _ids(decay) == {id(m.proj.weight), id(m.head.weight), id(m.ln.weight), id(m.gain.scale)}


def test_frozen_and_tied_params():
    m = Tiny()
    m.head.weight.requires_grad_(False)
    groups = param_groups(m, 0.1)
    assert id(m.head.weight) not in set().union(*map(_ids, groups))
    emb = torch.nn.Embedding(5, 3)
    lm = torch.nn.Linear(3, 5, bias=False)
    lm.weight = emb.weight  # tied
    (only,) = param_groups(torch.nn.Sequential(emb, lm), 0.1)
    assert len(only["params"]) == 1


def test_llama_norms_found():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    m = LlamaForCausalLM(cfg)
    names = {id(p): n for n, p in m.named_parameters()}
    decay, no_decay = param_groups(m, 0.01)
    assert sorted(names[i] for i in _ids(no_decay)) == sorted(
        [f"model.layers.{i}.{k}.weight" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm")]
        + ["model.norm.weight"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def _setup(name, lr=1e-4, wd=0.1, **kw):
    torch.manual_seed(0)
    m = Tiny()
    opt = build_optimizer(m, name=name, lr=lr, weight_decay=wd, **kw)
    p0 = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    return m, opt, p0


def _set_grads(m, step):
    # Tiny gradients (~1e-5, as per element in an 8B model after clipping) make eps placement visible.
    for i, (_, p) in enumerate(m.named_parameters()):
        g = torch.linspace(-2e-5, 3e-5, p.numel()).reshape(p.shape) * (1 + 0.3 * step + 0.1 * i)
        p.grad = g.to(p.dtype)


def test_nxdt_adamw_first_step_closed_form():
    # Step 1: m = (1-b1) g, v = (1-b2) g^2, step size lr*sqrt(1-b2)/(1-b1), eps added to sqrt(v):
    # update = lr * g / (|g| + eps / sqrt(1 - b2)); decoupled decay lr*wd*p (not for norms/biases).
    lr, wd, eps, b2 = 1e-4, 0.1, 1e-6, 0.999
    m, opt, p0 = _setup("adamw_fp32OptState", lr=lr, wd=wd)
    _set_grads(m, 0)
    g = {n: p.grad.double() for n, p in m.named_parameters()}
    opt.step()
    decayed = {"proj.weight", "head.weight"}
    for n, p in m.named_parameters():
        d = wd if n in decayed else 0.0
        want = p0[n] * (1 - lr * d) - lr * g[n] / (g[n].abs() + eps / math.sqrt(1 - b2))
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1.5e-7)  # fp32 rounding
        # torch's own eps placement would give a very different step here
        assert (p0[n] - lr * g[n] / (g[n].abs() + eps) - want).abs().max() > 1e-5


def _nxdt_reference(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
    """NxDT AdamW_FP32OptimParams' algorithm, written out in float64."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        p = p - lr * wd * p
    return p


def test_nxdt_adamw_matches_reference_over_steps_and_resume():
    lr, wd = 1e-4, 0.1
    m, opt, p0 = _setup("adamw_fp32OptState", lr=lr, wd=wd)
    grads = {n: [] for n in p0}
    for step in range(5):
        _set_grads(m, step)
        for n, p in m.named_parameters():
            grads[n].append(p.grad.double())
        opt.step()
        if step == 2:  # save and reload the optimizer mid-run into a fresh one
            state = opt.state_dict()
            opt = build_optimizer(m, name="adamw_fp32OptState", lr=lr, weight_decay=wd)
            opt.load_state_dict(state)
    for n, p in m.named_parameters():
        d = wd if n in {"proj.weight", "head.weight"} else 0.0
        want = _nxdt_reference(p0[n], grads[n], lr, d)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-7)


def test_torch_adamw_first_step_closed_form():
    lr, wd, eps = 1e-3, 0.1, 1e-8
    m, opt, p0 = _setup("adamw", lr=lr, wd=wd)
    assert type(opt) is torch.optim.AdamW and opt.defaults["eps"] == eps
    _set_grads(m, 0)
    g = {n: p.grad.double() for n, p in m.named_parameters()}
    opt.step()
    for n, p in m.named_parameters():
        d = wd if n in {"proj.weight", "head.weight"} else 0.0
        want = p0[n] * (1 - lr * d) - lr * g[n] / (g[n].abs() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=2e-7)


def test_names_and_defaults():
    m = Tiny()
    opt = build_optimizer(m, name="adamw_fp32OptState", lr=5e-7, weight_decay=0.01)
    assert isinstance(opt, NxdtAdamW) and opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert type(build_optimizer(m, name="adam", lr=1e-3, weight_decay=0.0)) is torch.optim.Adam
    assert build_optimizer(m, name="adamw", lr=1e-3, weight_decay=0.0, eps=1e-5).defaults["eps"] == 1e-5
    with pytest.raises(ValueError) as e:
        build_optimizer(m, name="sgd", lr=1e-3, weight_decay=0.0)
    assert all(n in str(e.value) for n in OPTIMIZERS)
