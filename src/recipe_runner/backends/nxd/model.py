"""A Llama made of neuronx-distributed parallel layers, parameter for parameter the NxD layout
that `convert-checkpoint` writes (names and shard shapes come from plan.layer_plan, checked
against prepare/nxd_layout.py in tests/test_nxd_plan.py). Imports NxD: Neuron DLC only.

Layout of activations: [B, S, H] without sequence parallelism; with it, [S/tp, B, H] between
the layers (NxD's convention: sequence dimension 0), gathered back to [B, S, H] at the end.
The column-parallel layers all-gather the sequence on entry and the row-parallel ones
reduce-scatter it on exit; norm weights carry `sequence_parallel_enabled` so NxD's optimizer
all-reduces their gradients over the tp group.

Attention is causal (sequences are right-padded, so a real token never sees padding, and padded
positions are never scored), or follows the 4-D block mask and position ids of packed rows
(model/attention.py). Verified only on Trn1 (needs NxD and NeuronCores).
"""

from __future__ import annotations

import math

import torch
from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
from neuronx_distributed.parallel_layers import mappings, parallel_state
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from recipe_runner.backends.nxd.plan import LayerPlan, vocab_range
from recipe_runner.model.attention import allowed_keys


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        setattr(self.weight, "sequence_parallel_enabled", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, plan: LayerPlan, sp: bool):
        super().__init__()
        a, d, p = plan.attention, plan.dims, plan.par
        self.a, self.sp = a, sp
        kw = dict(bias=False, gather_output=False, sequence_parallel_enabled=sp)
        if a.kind.startswith("gqa_qkv"):
            self.qkv_proj = GQAQKVColumnParallelLinear(d.hidden, [d.heads * d.head_dim, d.kv_heads * d.head_dim],
                                                       kv_size_multiplier=p.kv_size_multiplier, fuse_qkv=p.fuse_qkv, **kw)
        elif a.kind == "qkv_fused":
            self.qkv_proj = ColumnParallelLinear(d.hidden, 3 * d.heads * d.head_dim, **kw)
        else:
            self.q_proj = ColumnParallelLinear(d.hidden, d.heads * d.head_dim, **kw)
            self.k_proj = ColumnParallelLinear(d.hidden, d.kv_heads * d.head_dim, **kw)
            self.v_proj = ColumnParallelLinear(d.hidden, d.kv_heads * d.head_dim, **kw)
        self.o_proj = RowParallelLinear(d.heads * d.head_dim, d.hidden, bias=False, input_is_parallel=True,
                                        sequence_parallel_enabled=sp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        a = self.a
        if a.kind.startswith("gqa_qkv"):
            q, k, v = self.qkv_proj(x)
        elif a.kind == "qkv_fused":
            q, k, v = self.qkv_proj(x).split([a.q_rows, a.kv_rows, a.kv_rows], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # -> [B, heads, S, hd]
        order = (1, 2, 0, 3) if self.sp else (0, 2, 1, 3)
        q, k, v = (t.reshape(*t.shape[:2], -1, a.head_dim).permute(*order) for t in (q, k, v))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = a.local_heads // a.local_kv_heads  # plan.kv_group_of_heads: consecutive q heads share a kv head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        allowed = allowed_keys(mask, s, q.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # [B, heads, S, hd]
        out = out.permute(2, 0, 1, 3) if self.sp else out.permute(0, 2, 1, 3)
        return self.o_proj(out.reshape(*out.shape[:2], a.q_rows))


class MLP(nn.Module):
    def __init__(self, plan: LayerPlan, sp: bool):
        super().__init__()
        d = plan.dims
        self.local = plan.mlp_local
        self.gate_up_proj = ColumnParallelLinear(d.hidden, 2 * d.intermediate, stride=2, bias=False, gather_output=False,
                                                 sequence_parallel_enabled=sp)
        self.down_proj = RowParallelLinear(d.intermediate, d.hidden, bias=False, input_is_parallel=True,
                                           sequence_parallel_enabled=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.local, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, plan: LayerPlan, eps: float, sp: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(plan.dims.hidden, eps, sp)
        self.self_attn = Attention(plan, sp)
        self.post_attention_layernorm = RMSNorm(plan.dims.hidden, eps, sp)
        self.mlp = MLP(plan, sp)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Out:
    def __init__(self, h):
        self.last_hidden_state = h


class Body(nn.Module):
    """`model.` of the NxD names: embedding, layers, final norm; returns [B, S, H] hidden states,
    through the region op whose backward sums the ranks' partial gradients."""

    def __init__(self, plan: LayerPlan, hf_config, sp: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        d, eps = plan.dims, hf_config.rms_norm_eps
        self.sp = sp
        self.embed_tokens = ParallelEmbedding(d.vocab, d.hidden)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(plan, eps, sp) for i in plan.layers})
        self.norm = RMSNorm(d.hidden, eps, sp)
        self.rotary_emb = LlamaRotaryEmbedding(config=hf_config)  # handles Llama 3.1 rope scaling
        self.checkpoint_layers = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        """attention_mask: a 2-D padding mask (ignored: causal attention over right padding) or
        the 4-D mask of packed rows, which then come with their restarting position_ids."""
        h = self.embed_tokens(input_ids)  # [B, S, H], all-reduced over tp
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        pos = position_ids if position_ids is not None else torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(h, pos)
        cos, sin = cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)  # [1 or B, 1, S, hd]
        if self.sp:
            h = mappings.scatter_to_sequence_parallel_region(h.transpose(0, 1).contiguous(), 0)
        for layer in self.layers.values():
            if self.checkpoint_layers and self.training:
                from torch_xla.utils.checkpoint import checkpoint

                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=True)
            else:
                h = layer(h, cos, sin, mask)
        h = self.norm(h)
        if self.sp:
            h = mappings.gather_from_sequence_parallel_region(h, 0, to_model_parallel=True).transpose(0, 1)
        else:
            h = mappings.copy_to_tensor_model_parallel_region(h)
        return _Out(h)


class ParallelLlama(nn.Module):
    """Parameters named `model.embed_tokens.weight`, `model.layers.{i}....`, `model.norm.weight`,
    `lm_head.weight`, as the converted rank files (ModuleDict keys are the global layer index)."""

    def __init__(self, plan: LayerPlan, hf_config, *, sequence_parallel: bool, checkpoint_layers: bool):
        super().__init__()
        if plan.par.pp_size != 1:
            raise ValueError("pipeline parallelism is not supported by this adapter")
        self.plan = plan
        self.model = Body(plan, hf_config, sequence_parallel)
        self.model.checkpoint_layers = checkpoint_layers
        self.lm_head = ColumnParallelLinear(plan.dims.hidden, plan.dims.vocab, bias=False, gather_output=False)
        self.config = hf_config

    def get_decoder(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def vocab_start(self) -> int:
        return vocab_range(self.plan.dims.vocab, self.plan.par.tp_size, parallel_state.get_tensor_model_parallel_rank())[0]


def tp_reducers():
    """(reduce_max, reduce_sum) over the tensor-parallel group, in place, for vocab_parallel."""
    group = parallel_state.get_tensor_model_parallel_group()

    def reduce_max(t):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
        return t

    def reduce_sum(t):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
        return t

    return reduce_max, reduce_sum
