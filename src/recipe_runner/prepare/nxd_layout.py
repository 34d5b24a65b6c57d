"""Where every Hugging Face Llama weight goes in the NxD tensor/pipeline-parallel layout.

Pure functions, no I/O. One table serves both directions and the shape check: each NxD tensor of
a (tp_rank, pp_rank) file is described as a list of slices of HF tensors, concatenated along one
dimension (`NxdTensor`). HF -> NxD reads those slices; NxD -> HF writes them back; shapes come
from the same description, so the three can never disagree.

Layout (what neuronx-distributed's Llama model and its `checkpoint_converter.py` use, trn1):
- embed_tokens / lm_head: split on dim 0 (vocab) over tp ranks; embed lives on pp rank 0,
  lm_head and the final norm on the last pp rank.
- layers: split over pp ranks as NxD's `create_partitions` does: L // pp each, the remainder
  going one extra layer each to the LAST ranks.
- with qkv_linear (GQAQKVColumnParallelLinear): the K kv heads are tiled kv_size_multiplier (m)
  times (K0..K{K-1}, K0.., ...), giving K*m replicated heads R; tp rank r holds R in
  [r*K*m/T, (r+1)*K*m/T). Replicated head R is original kv head R % K and is paired with q-head
  group g(R) = (R % K) * m + R // K of H/(K*m) consecutive q heads. For Llama3-8B (H=32, K=8,
  m=4, T=32) this is the documented rule "rank r gets q head 4*(r%8)+r//8, kv head r%8".
  Unlike NxD's converter (which only works when K*m == T) this also covers K*m a multiple of T.
  o_proj takes the same q-head permutation on dim 1. fuse_qkv stores cat(q, k, v) per rank as
  `qkv_proj.weight_qkv` (we split it back by the known sizes, not in equal thirds as NxD does).
- without qkv_linear: q/k/v_proj split on dim 0 (fused into `qkv_proj.weight` per rank when
  fuse_qkv and heads == kv heads, as NxD's model does), no kv replication.
- gate_proj/up_proj: each split on dim 0, stored per rank as gate_up_proj = [gate; up].
- down_proj: split on dim 1. Norms: replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipe_runner.errors import UserError

ATTN = "model.layers.{i}.self_attn."
MLP = "model.layers.{i}.mlp."


@dataclass(frozen=True)
class LlamaDims:
    """The few numbers of a Llama config the layout depends on."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    tied: bool = False


@dataclass(frozen=True)
class Piece:
    """hf_name.narrow(dim, start, stop - start); dim is the owning NxdTensor's dim."""

    hf_name: str
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class NxdTensor:
    """One tensor of an NxD rank file: cat([piece slices], dim)."""

    name: str
    dim: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Parallel:
    """The parallel settings a checkpoint is laid out for."""

    tp_size: int
    pp_size: int = 1
    kv_size_multiplier: int = 1
    qkv_linear: bool = True
    fuse_qkv: bool = False


def llama_dims(hf_config) -> LlamaDims:
    """Read a HF Llama config (dict or PretrainedConfig) into LlamaDims, with errors that name the key."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size") if cfg.get(k) is None]
    if missing:
        raise UserError(f"model config lacks {', '.join(missing)}: pass a Hugging Face Llama config.json (--config)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("model config has attention_bias/mlp_bias: the NxD Llama layout has no biases; convert a bias-free Llama")
    heads = int(cfg["num_attention_heads"])
    return LlamaDims(
        hidden=int(cfg["hidden_size"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        intermediate=int(cfg["intermediate_size"]),
        layers=int(cfg["num_hidden_layers"]),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def check_geometry(d: LlamaDims, p: Parallel) -> None:
    """Raise UserError on the first setting the NxD layout cannot hold, naming the numbers and a fix."""
    T, m, K, H = p.tp_size, p.kv_size_multiplier, d.kv_heads, d.heads
    if T < 1 or p.pp_size < 1 or m < 1:
        raise UserError(f"tp_size ({T}), pp_size ({p.pp_size}) and kv_size_multiplier ({m}) must be >= 1")
    if H % K:
        raise UserError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {K}: not a valid Llama config")
    if H % T:
        raise UserError(f"num_attention_heads {H} is not divisible by tp_size {T}: use a tp_size that divides {H}")
    if d.vocab % T:
        raise UserError(f"vocab_size {d.vocab} is not divisible by tp_size {T} (NxD splits the vocabulary evenly and does not pad): "
                        f"use a tp_size that divides {d.vocab}, or pad the embedding and lm_head to a multiple of {T}")
    if d.intermediate % T:
        raise UserError(f"intermediate_size {d.intermediate} is not divisible by tp_size {T}: use a tp_size that divides it")
    if d.layers < p.pp_size:
        raise UserError(f"num_hidden_layers {d.layers} is smaller than pp_size {p.pp_size}: every pipeline rank needs at least one layer")
    if p.qkv_linear:
        if T % m:
            raise UserError(f"tp_size {T} is not divisible by kv_size_multiplier {m} (NxD's GQAQKVColumnParallelLinear requires it): "
                            f"use a kv_size_multiplier that divides {T}")
        if (K * m) % T:
            fix = f"set kv_size_multiplier to {T // K}" if T % K == 0 else f"use a tp_size that divides {K * m}"
            raise UserError(f"num_key_value_heads {K} x kv_size_multiplier {m} = {K * m} replicated kv heads cannot be split over "
                            f"tp_size {T}: {fix}")
        if (H // K) % m:
            raise UserError(f"kv_size_multiplier {m} does not divide the {H // K} query heads per kv head: "
                            f"use a kv_size_multiplier that divides {H // K}")
    else:
        if m != 1:
            raise UserError(f"kv_size_multiplier {m} needs qkv_linear (GQAQKVColumnParallelLinear replicates kv heads): "
                            "enable qkv_linear or set kv_size_multiplier to 1")
        if K % T:
            raise UserError(f"num_key_value_heads {K} is not divisible by tp_size {T} without qkv_linear: "
                            f"enable qkv_linear with kv_size_multiplier {max(1, T // K)}, or use a tp_size that divides {K}")


def pp_layer_ranges(layers: int, pp_size: int) -> list[range]:
    """Layers held by each pp rank: NxD's create_partitions (remainder to the last ranks)."""
    base, rem = divmod(layers, pp_size)
    sizes = [base + (1 if r >= pp_size - rem else 0) for r in range(pp_size)]
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


def hf_param_shapes(d: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every HF state-dict name and shape, in checkpoint order (lm_head left out when tied)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (d.vocab, d.hidden)}
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    for i in range(d.layers):
        a, f = ATTN.format(i=i), MLP.format(i=i)
        shapes[a + "q_proj.weight"] = (q, d.hidden)
        shapes[a + "k_proj.weight"] = (kv, d.hidden)
        shapes[a + "v_proj.weight"] = (kv, d.hidden)
        shapes[a + "o_proj.weight"] = (d.hidden, q)
        shapes[f + "gate_proj.weight"] = (d.intermediate, d.hidden)
        shapes[f + "up_proj.weight"] = (d.intermediate, d.hidden)
        shapes[f + "down_proj.weight"] = (d.hidden, d.intermediate)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (d.hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (d.hidden,)
    shapes["model.norm.weight"] = (d.hidden,)
    if not d.tied:
        shapes["lm_head.weight"] = (d.vocab, d.hidden)
    return shapes


def _split(name: str, size: int, parts: int, rank: int) -> Piece:
    n = size // parts
    return Piece(name, rank * n, (rank + 1) * n)


def _qkv_pieces(d: LlamaDims, p: Parallel, i: int, r: int) -> tuple[list[Piece], list[Piece], list[Piece]]:
    """q, k, v row pieces of tp rank r for layer i (see the module docstring for the rule)."""
    a, hd, T = ATTN.format(i=i), d.head_dim, p.tp_size
    if not p.qkv_linear:
        return ([_split(a + "q_proj.weight", d.heads * hd, T, r)], [_split(a + "k_proj.weight", d.kv_heads * hd, T, r)],
                [_split(a + "v_proj.weight", d.kv_heads * hd, T, r)])
    K, m = d.kv_heads, p.kv_size_multiplier
    per_rank = K * m // T
    group = d.heads // (K * m) * hd  # rows of q per replicated kv head
    q, k, v = [], [], []
    for R in range(r * per_rank, (r + 1) * per_rank):
        head, g = R % K, (R % K) * m + R // K
        q.append(Piece(a + "q_proj.weight", g * group, (g + 1) * group))
        k.append(Piece(a + "k_proj.weight", head * hd, (head + 1) * hd))
        v.append(Piece(a + "v_proj.weight", head * hd, (head + 1) * hd))
    return q, k, v


def _merge_adjacent(pieces: list[Piece]) -> tuple[Piece, ...]:
    """Join consecutive slices of the same tensor so readers do one slice instead of many."""
    out: list[Piece] = []
    for pc in pieces:
        if out and out[-1].hf_name == pc.hf_name and out[-1].stop == pc.start:
            out[-1] = Piece(pc.hf_name, out[-1].start, pc.stop)
        else:
            out.append(pc)
    return tuple(out)


def rank_layout(hf_config_or_dims, p: Parallel, tp_rank: int, pp_rank: int) -> list[NxdTensor]:
    """The tensors of file (tp_rank, pp_rank), in order, each as slices of HF tensors."""
    d = hf_config_or_dims if isinstance(hf_config_or_dims, LlamaDims) else llama_dims(hf_config_or_dims)
    T, r = p.tp_size, tp_rank
    lm_head = "model.embed_tokens.weight" if d.tied else "lm_head.weight"
    out: list[NxdTensor] = []

    def add(name: str, dim: int, pieces: list[Piece]) -> None:
        out.append(NxdTensor(name, dim, _merge_adjacent(pieces)))

    if pp_rank == 0:
        add("model.embed_tokens.weight", 0, [_split("model.embed_tokens.weight", d.vocab, T, r)])
    for i in pp_layer_ranges(d.layers, p.pp_size)[pp_rank]:
        a, f = ATTN.format(i=i), MLP.format(i=i)
        q, k, v = _qkv_pieces(d, p, i, r)
        if p.qkv_linear and p.fuse_qkv:
            add(a + "qkv_proj.weight_qkv", 0, q + k + v)
        elif p.qkv_linear:
            add(a + "qkv_proj.weight_q", 0, q)
            add(a + "qkv_proj.weight_k", 0, k)
            add(a + "qkv_proj.weight_v", 0, v)
        elif p.fuse_qkv and d.heads == d.kv_heads:
            add(a + "qkv_proj.weight", 0, q + k + v)
        else:
            add(a + "q_proj.weight", 0, q)
            add(a + "k_proj.weight", 0, k)
            add(a + "v_proj.weight", 0, v)
        # o_proj's input columns follow the q rows of this rank
        add(a + "o_proj.weight", 1, [Piece(a + "o_proj.weight", pc.start, pc.stop) for pc in q])
        add(f + "gate_up_proj.weight", 0, [_split(f + "gate_proj.weight", d.intermediate, T, r), _split(f + "up_proj.weight", d.intermediate, T, r)])
        add(f + "down_proj.weight", 1, [_split(f + "down_proj.weight", d.intermediate, T, r)])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            add(name, 0, [Piece(name, 0, d.hidden)])
    if pp_rank == p.pp_size - 1:
        add("model.norm.weight", 0, [Piece("model.norm.weight", 0, d.hidden)])
        add("lm_head.weight", 0, [_split(lm_head, d.vocab, T, r)])
    return out


def nxd_tensor_shape(t: NxdTensor, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    shape = list(hf_shapes[t.pieces[0].hf_name])
    shape[t.dim] = sum(pc.length for pc in t.pieces)
    return tuple(shape)


def nxd_param_shapes(hf_config, tp_size: int, pp_size: int = 1, kv_size_multiplier: int = 1, qkv_linear: bool = True,
                     fuse_qkv: bool = False) -> dict[tuple[int, int], dict[str, tuple[int, ...]]]:
    """{(tp_rank, pp_rank): {nxd_name: shape}}: what each NxD rank file holds, after checking the geometry."""
    d = llama_dims(hf_config)
    p = Parallel(tp_size, pp_size, kv_size_multiplier, qkv_linear, fuse_qkv)
    check_geometry(d, p)
    hf = hf_param_shapes(d)
    return {(t, pp): {x.name: nxd_tensor_shape(x, hf) for x in rank_layout(d, p, t, pp)}
            for pp in range(pp_size) for t in range(tp_size)}
