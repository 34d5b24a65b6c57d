"""What the tensor-parallel Llama of backends/nxd/model.py is made of, as pure numbers.

The adapter builds its layers from `layer_plan` and nothing else, so the names and per-rank
shapes of its parameters can be checked here, without neuronx-distributed, against the layout
that `convert-checkpoint` writes (prepare/nxd_layout.py, derived independently from HF slices).
NxD's layers keep a `[out, in]` weight: ColumnParallelLinear holds out/tp rows,
RowParallelLinear in/tp columns, ParallelEmbedding vocab/tp rows, GQAQKVColumnParallelLinear
q/tp rows of q and K*m/tp kv heads of k and v (kv heads tiled m = kv_size_multiplier times).

Rank placement follows NxD's parallel_state.initialize_model_parallel: global ranks reshaped
row-major to [pp, dp, tp], tp contiguous so tensor-parallel traffic stays inside a node.
(NxD special-cases TP=4 on trn1, interleaving the ranks of a node; `rank_coords` does the same
when told the local world size.)
"""

from __future__ import annotations

from dataclasses import dataclass

from recipe_runner.prepare.nxd_layout import LlamaDims, Parallel, check_geometry, pp_layer_ranges

RANK_FILE = "dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


@dataclass(frozen=True)
class RankCoords:
    pp: int
    dp: int
    tp: int


def rank_coords(rank: int, world: int, tp: int, pp: int = 1, *, local_world: int | None = None,
                trn1: bool = False) -> RankCoords:
    """(pp, dp, tp) of a global rank, as NxD's initialize_model_parallel places it."""
    if world % (tp * pp):
        raise ValueError(f"world {world} is not divisible by tp {tp} x pp {pp}")
    dp_size = world // (tp * pp)
    pp_rank, rest = divmod(rank, dp_size * tp)
    if tp == 4 and trn1:  # TP groups take every (local_world/4)-th rank of a node
        local = local_world or world
        per_group = local // tp          # local ranks between two members of a TP group
        node, pos = divmod(rest, local)
        tp_rank, group_in_node = divmod(pos, per_group)
        return RankCoords(pp_rank, node * per_group + group_in_node, tp_rank)
    dp_rank, tp_rank = divmod(rest, tp)
    return RankCoords(pp_rank, dp_rank, tp_rank)


def checkpoint_file(coords: RankCoords) -> str:
    """The converted rank file this rank loads (every dp replica loads dp_rank_00)."""
    return RANK_FILE.format(tp=coords.tp, pp=coords.pp)


@dataclass(frozen=True)
class AttentionPlan:
    local_heads: int        # query heads on this rank
    local_kv_heads: int     # (replicated) kv heads on this rank
    head_dim: int
    q_rows: int             # local q projection rows
    kv_rows: int            # local k (and v) projection rows
    kind: str               # gqa_qkv | gqa_qkv_fused | qkv_fused | separate


@dataclass(frozen=True)
class LayerPlan:
    dims: LlamaDims
    par: Parallel
    attention: AttentionPlan
    mlp_local: int          # intermediate columns per rank (gate_up holds 2x)
    vocab_local: int
    layers: tuple[int, ...]  # global layer indices on this pp rank
    first_stage: bool
    last_stage: bool


def attention_plan(d: LlamaDims, p: Parallel) -> AttentionPlan:
    T = p.tp_size
    heads = d.heads // T
    if p.qkv_linear:
        kv = d.kv_heads * p.kv_size_multiplier // T
        kind = "gqa_qkv_fused" if p.fuse_qkv else "gqa_qkv"
    else:
        kv = d.kv_heads // T
        kind = "qkv_fused" if p.fuse_qkv and d.heads == d.kv_heads else "separate"
    return AttentionPlan(heads, kv, d.head_dim, heads * d.head_dim, kv * d.head_dim, kind)


def layer_plan(d: LlamaDims, p: Parallel, pp_rank: int = 0) -> LayerPlan:
    check_geometry(d, p)
    return LayerPlan(d, p, attention_plan(d, p), d.intermediate // p.tp_size, d.vocab // p.tp_size,
                     tuple(pp_layer_ranges(d.layers, p.pp_size)[pp_rank]), pp_rank == 0, pp_rank == p.pp_size - 1)


def param_shapes(plan: LayerPlan) -> dict[str, tuple[int, ...]]:
    """Name -> local shape of every parameter the adapter's model creates on one rank, in the
    module order (what its state_dict lists)."""
    d, a = plan.dims, plan.attention
    H = d.hidden
    out: dict[str, tuple[int, ...]] = {}
    if plan.first_stage:
        out["model.embed_tokens.weight"] = (plan.vocab_local, H)
    for i in plan.layers:
        pre = f"model.layers.{i}."
        at = pre + "self_attn."
        if a.kind == "gqa_qkv_fused":
            out[at + "qkv_proj.weight_qkv"] = (a.q_rows + 2 * a.kv_rows, H)
        elif a.kind == "gqa_qkv":
            out[at + "qkv_proj.weight_q"] = (a.q_rows, H)
            out[at + "qkv_proj.weight_k"] = (a.kv_rows, H)
            out[at + "qkv_proj.weight_v"] = (a.kv_rows, H)
        elif a.kind == "qkv_fused":
            out[at + "qkv_proj.weight"] = (a.q_rows + 2 * a.kv_rows, H)
        else:
            out[at + "q_proj.weight"] = (a.q_rows, H)
            out[at + "k_proj.weight"] = (a.kv_rows, H)
            out[at + "v_proj.weight"] = (a.kv_rows, H)
        out[at + "o_proj.weight"] = (H, a.q_rows)
        out[pre + "mlp.gate_up_proj.weight"] = (2 * plan.mlp_local, H)
        out[pre + "mlp.down_proj.weight"] = (H, plan.mlp_local)
        out[pre + "input_layernorm.weight"] = (H,)
        out[pre + "post_attention_layernorm.weight"] = (H,)
    if plan.last_stage:
        out["model.norm.weight"] = (H,)
        out["lm_head.weight"] = (plan.vocab_local, H)
    return out


def vocab_range(vocab: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the vocabulary rows held by a tp rank (NxD splits evenly, no padding)."""
    n = vocab // tp_size
    return tp_rank * n, (tp_rank + 1) * n


def kv_group_of_heads(plan: LayerPlan) -> list[int]:
    """For each local query head, the local kv head it attends with: the converter stores, per
    replicated kv head, its group of H/(K*m) consecutive query heads, so the grouping is plain
    repeat_interleave on the rank."""
    a = plan.attention
    group = a.local_heads // a.local_kv_heads
    return [h // group for h in range(a.local_heads)]
