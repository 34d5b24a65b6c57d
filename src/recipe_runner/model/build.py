"""Build the policy: a Hugging Face Llama from `model.model_config`, weights from
`exp_manager.resume_from_checkpoint` (a Hugging Face directory or the NxD layout).

NxDT lets the recipe restate the architecture (num_layers, hidden_size, rope_theta,
max_position_embeddings). Keys that change weight shapes must agree with config.json (a mismatch
could only fail later while loading); rope_theta and max_position_embeddings override it, as in
NxDT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from recipe_runner.errors import UserError


def load_config(recipe):
    from transformers import AutoConfig

    path = Path(recipe.model.model_config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"model.model_config: {path} does not exist. Point it at the model's config.json "
                        f"(`recipe-runner fetch` brings it with the weights).")
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **data)
    m = recipe.model
    for key, attr in (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size")):
        want = getattr(m, key)
        if want is not None and want != getattr(config, attr):
            raise UserError(f"model.{key} is {want} but {path} says {attr}={getattr(config, attr)}: "
                            f"remove model.{key} or use the matching config.json")
    if m.rope_theta is not None:
        if getattr(config, "rope_parameters", None):  # transformers >= 5 keeps rope settings here
            config.rope_parameters["rope_theta"] = m.rope_theta
        config.rope_theta = m.rope_theta
    if m.max_position_embeddings is not None:
        config.max_position_embeddings = m.max_position_embeddings
    return config


def checkpoint_kind(path: str | None) -> str | None:
    """'hf', 'nxd' or None (no starting checkpoint: random init)."""
    if not path:
        return None
    p = Path(path)
    if (p / "model").is_dir() and any((p / "model").glob("dp_rank_*")):
        return "nxd"
    if any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
        return "hf"
    raise UserError(f"exp_manager.resume_from_checkpoint: {path} holds neither a Hugging Face model "
                    f"(*.safetensors / *.bin) nor an NxD checkpoint (model/dp_rank_*.pt). Run "
                    f"`recipe-runner fetch` / `recipe-runner convert-checkpoint` first, or fix the path.")


@contextlib.contextmanager
def _created_on(device, dtype: torch.dtype):
    """New tensors on `device` in `dtype` (random init straight on the accelerator)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_model(recipe, *, trust_remote_code: bool = False, init_device="cpu",
                init_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The policy, loaded in fp32 on the CPU (the training loop moves it to its device). A random
    init (no starting checkpoint: benchmarks, smoke runs) is made on `init_device` in `init_dtype`
    directly: drawing 8B normal samples on one CPU thread and holding 32 GB of fp32 weights
    only to convert them would take minutes of a GPU lease."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # carriage-return bars are noise in `kubectl logs`
    config = load_config(recipe)
    start = recipe.exp_manager.resume_from_checkpoint
    kind = checkpoint_kind(start)
    torch.manual_seed(recipe.seed)
    if kind == "hf" and not (Path(start) / "config.json").is_file() and (Path(start) / "model.safetensors").is_file():
        # a recipe-runner checkpoint (weights only, no config.json): transformers 5's from_pretrained
        # fails on such a directory with a TypeError, so load the weights ourselves
        from safetensors.torch import load_model

        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        load_model(model, str(Path(start) / "model.safetensors"), strict=True)
    elif kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(start, config=config, trust_remote_code=trust_remote_code,
                                                     **_dtype(torch.float32))
    else:
        device, dtype = (init_device, init_dtype) if kind is None else ("cpu", torch.float32)
        with _created_on(device, dtype):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **_dtype(dtype))
        if kind == "nxd":
            from recipe_runner.prepare.convert import load_nxd_as_hf_state_dict

            ds = recipe.distributed_strategy
            state = load_nxd_as_hf_state_dict(start, config, kv_size_multiplier=ds.kv_replicator,
                                              qkv_linear=recipe.model.qkv_linear, fuse_qkv=recipe.model.fuse_qkv)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
            if missing or unexpected:
                raise UserError(f"{start}: NxD checkpoint does not match model.model_config "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); tp={ds.tensor_model_parallel_size}")
        else:
            print("warning: exp_manager.resume_from_checkpoint is not set: starting from random weights")
    if recipe.model.activations_checkpoint_granularity == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _dtype(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 calls it `dtype` (and 5.x defaults to "auto", or config.json's
    torch_dtype); older ones `torch_dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def fingerprint(path: str | None, extra: str = "") -> str:
    """A cheap identity of a checkpoint directory: names, sizes and the first and last MiB of
    each file. Hashing 16 GB of weights on every start would cost minutes; a changed checkpoint
    practically always changes one of these."""
    h = hashlib.sha256(extra.encode())
    if path:
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(path)}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]
