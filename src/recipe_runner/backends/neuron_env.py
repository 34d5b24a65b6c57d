"""Recipe -> Neuron environment variables, as NxDT's launcher derives them (train_setup.sh and
training_orchestrator's process_config), in one pure function.

Why a function and not a shell script: the same mapping serves `train` (applied to os.environ
before torch_xla initialises, because the Neuron runtime and compiler read them once at start),
`compile` (passed to the neuron_parallel_compile child) and `compile --print-env` (exported by a
container entrypoint before torchrun, which is the only way MALLOC_ARENA_MAX takes effect: glibc
reads it when a process starts).

Precision (torch-xla 2.9): XLA_USE_BF16 / XLA_DOWNCAST_BF16 are deprecated there, so this engine
does bf16 with torch.autocast("xla") on fp32 weights (mixed_precision, autocast) or with bf16
weights (bf16SR); both flags are set to "0" except for `precision.type: manual`, which passes the
recipe's values through unchanged, as NxDT does. The compiler flags per type follow NxDT.
"""

from __future__ import annotations

import os
import shlex

DEFAULT_CACHE_DIR = "/var/tmp/neuron-compile-cache"  # neuronx-cc's own default

# precision.type -> (NEURON_RT_STOCHASTIC_ROUNDING_EN, extra NEURON_CC_FLAGS)
_PRECISION = {
    "fp32": ("0", "--auto-cast none"),
    "mixed_precision": ("0", "--enable-mixed-precision-accumulation"),
    "mixed_precisionSR": ("1", "--enable-mixed-precision-accumulation"),
    "bf16SR": ("1", "--enable-mixed-precision-accumulation"),
    "autocast": ("0", "--enable-mixed-precision-accumulation --auto-cast none"),
}


def is_remote_cache(url: str | None) -> bool:
    return bool(url) and "://" in str(url) and not str(url).startswith("file://")


def compile_cache_dir(recipe) -> str:
    """Where compiled graphs (NEFFs) live: the recipe's compiler_cache_url, else the compiler default."""
    url = recipe.compiler_cache_url
    if url:
        return str(url)[len("file://"):] if str(url).startswith("file://") else str(url)
    return DEFAULT_CACHE_DIR


def merge_flags(existing: str, extra: str) -> str:
    """Append compiler flags not already present, so re-applying (train under compile) is a no-op.
    A `--key=value` or `--key value` already given by the user wins over the recipe's."""
    have = shlex.split(existing or "")
    keys = {t.split("=", 1)[0] for t in have if t.startswith("-")}
    out, new = list(have), shlex.split(extra or "")
    i = 0
    while i < len(new):
        tok = new[i]
        takes_value = "=" not in tok and i + 1 < len(new) and not new[i + 1].startswith("-")
        group = new[i:i + 2] if takes_value else [tok]
        if tok.split("=", 1)[0] not in keys:
            out += group
        i += len(group)
    return " ".join(shlex.quote(t) for t in out)


def neuron_env(recipe, base_flags: str = "") -> dict[str, str]:
    """The environment a Neuron training process of this recipe needs (strings only).

    base_flags: NEURON_CC_FLAGS already in the environment; the result extends it."""
    m, p = recipe.model, recipe.precision
    env: dict[str, str] = {
        "MALLOC_ARENA_MAX": "128",  # host OOM otherwise (NxDT train_setup.sh)
        "XLA_DISABLE_FUNCTIONALIZATION": "0",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": str(recipe.aync_exec_max_inflight_requests),
        "NEURON_RT_EXEC_TIMEOUT": str(recipe.neuron_rt_exec_timeout),
        "BUCKET_CAP_MB": str(recipe.bucket_size_collectives),
        "NEURON_EXPERIMENTAL_COMPRESS_RG": "1" if recipe.neuron_experimental_compress_rg else "0",
    }
    if m.fusions.softmax:
        env["NEURON_FUSE_SOFTMAX"] = "1"
    flags = recipe.compiler_flags or ""
    url = recipe.compiler_cache_url
    if is_remote_cache(url):
        env["NEURON_COMPILE_CACHE_URL"] = str(url)
    else:
        cache = compile_cache_dir(recipe)
        env["NEURON_COMPILE_CACHE_URL"] = cache
        flags += f" --cache_dir={cache}"
    if p.type == "manual":
        env["XLA_USE_BF16"] = str(p.xla_use_bf16)
        env["XLA_DOWNCAST_BF16"] = str(p.xla_downcast_bf16)
        env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] = str(p.neuron_rt_stochastic_rounding_en)
    else:
        sr, extra = _PRECISION[p.type]
        env.update(XLA_USE_BF16="0", XLA_DOWNCAST_BF16="0", NEURON_RT_STOCHASTIC_ROUNDING_EN=sr)
        flags += " " + extra
    env["NEURON_CC_FLAGS"] = merge_flags(base_flags, flags)
    if recipe.trainer.num_nodes > 1:  # EFA between trn1 nodes
        env.update(FI_PROVIDER="efa", FI_EFA_USE_DEVICE_RDMA="1", FI_EFA_FORK_SAFE="1")
    return env


def apply_neuron_env(recipe, environ=None) -> dict[str, str]:
    """Set neuron_env(recipe) in `environ` (default os.environ); returns what was set. Must run
    before torch_xla is imported: the runtime reads these once."""
    environ = os.environ if environ is None else environ
    env = neuron_env(recipe, base_flags=environ.get("NEURON_CC_FLAGS", ""))
    environ.update(env)
    return env


def export_lines(env: dict[str, str]) -> str:
    """`export K=V` lines for a shell (`eval "$(recipe-runner compile RECIPE --print-env)"`)."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
