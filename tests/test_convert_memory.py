"""convert-checkpoint streams: peak memory follows the output shard, not the model size.

A ~200 MB fp32 Llama-shaped checkpoint (random weights, 3 safetensors shards) is converted with
tp 4 in a child process that reports its peak RSS after importing the modules (the baseline) and
after converting. HF -> NxD must stay within 2x the largest rank file (+64 MB); NxD -> HF within
its largest safetensors shard + 2 decoder layers (+64 MB). Holding the whole model would not fit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from recipe_runner.prepare.nxd_layout import hf_param_shapes, llama_dims

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, num_attention_heads=8,
              num_key_value_heads=2, intermediate_size=3072, num_hidden_layers=3, vocab_size=8192, rms_norm_eps=1e-5,
              tie_word_embeddings=False, torch_dtype="float32")
MB = 2**20

# VmHWM (peak RSS of this process image) rather than getrusage's ru_maxrss: Linux carries
# ru_maxrss over fork+exec, so a child would start at the parent's (pytest's) peak.
DRIVER = """
import sys
def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
from recipe_runner.prepare.nxd_convert import hf_to_nxd, nxd_to_hf
mode, src, dst = sys.argv[1:4]
print(peak())
quiet = lambda s: None
if mode == "hf_to_nxd":
    hf_to_nxd(input=src, output=dst, tp_size=4, kv_size_multiplier=2, save_xser=False, log=quiet)
elif mode == "nxd_to_hf":
    nxd_to_hf(input=src, output=dst, max_shard_size="64MiB", log=quiet)
print(peak())
"""


def peak_above_imports(*argv: str) -> int:
    """Peak RSS of a child converting, minus its peak after the imports alone."""
    out = subprocess.run([sys.executable, "-c", DRIVER, *argv], check=True, capture_output=True, text=True)
    base, peak = (int(x) for x in out.stdout.split()[-2:])
    return peak - base


def write_checkpoint(d: Path) -> int:
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    shapes = hf_param_shapes(llama_dims(CONFIG))
    names = list(shapes)
    weight_map, total, gen = {}, 0, torch.Generator().manual_seed(0)
    for i, chunk in enumerate([names[:12], names[12:24], names[24:]], 1):
        f = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: torch.randn(shapes[n], generator=gen) for n in chunk}, str(d / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in chunk})
        total += (d / f).stat().st_size
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def test_peak_memory_tracks_the_output_shard(tmp_path):
    model_bytes = write_checkpoint(tmp_path / "hf")
    assert model_bytes > 200 * MB
    used = peak_above_imports("hf_to_nxd", str(tmp_path / "hf"), str(tmp_path / "nxd"))
    shard = max(f.stat().st_size for f in (tmp_path / "nxd" / "model").glob("*.pt"))
    print(f"hf->nxd: model {model_bytes / MB:.0f} MB, largest rank file {shard / MB:.0f} MB, peak above imports {used / MB:.0f} MB")
    assert used < 2 * shard + 64 * MB

    used = peak_above_imports("nxd_to_hf", str(tmp_path / "nxd"), str(tmp_path / "back"))
    out_shard = max(f.stat().st_size for f in (tmp_path / "back").glob("*.safetensors"))
    layer = 46 * MB  # one decoder layer: 11.5M fp32 params
    print(f"nxd->hf: largest safetensors shard {out_shard / MB:.0f} MB, peak above imports {used / MB:.0f} MB")
    assert out_shard <= 64 * MB + 1 * MB
    assert used < out_shard + 2 * layer + 64 * MB
