"""convert-checkpoint: HF <-> NxD round trips, the NxD layout by value, geometry errors, re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from recipe_runner.cli import main
from recipe_runner.errors import UserError
from recipe_runner.prepare import nxd_io
from recipe_runner.prepare.convert import hf_to_nxd, load_nxd_as_hf_state_dict, nxd_param_shapes, nxd_to_hf

QUIET = {"log": lambda s: None}


def tiny_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=96,
                num_hidden_layers=4, vocab_size=128, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def save_hf(cfg: LlamaConfig, d: Path, fmt: str = "safetensors", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny Llama saved as a HF directory in one of the input formats; returns its state dict."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if fmt == "safetensors":
        model.save_pretrained(d)
    elif fmt == "sharded":
        model.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").is_file()
    else:  # .bin: transformers 5 no longer writes it, so write what older versions did
        cfg.save_pretrained(d)
        sd = {k: v.clone() for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        if fmt == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        else:  # sharded .bin with an index
            names = list(sd)
            halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            for f, ks in halves.items():
                torch.save({k: sd[k] for k in ks}, d / f)
            (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    return {k: v.clone() for k, v in model.state_dict().items()}


def read_hf_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# (tp, pp, kv multiplier, qkv_linear, fuse_qkv, xser, input format, layers)
CASES = [
    (1, 1, 1, True, False, True, "safetensors", 4),
    (2, 1, 1, True, True, False, "safetensors", 4),
    (2, 2, 2, True, False, True, "sharded", 4),
    (4, 1, 2, True, True, True, "bin", 4),
    (4, 2, 4, True, False, False, "bin-sharded", 3),  # 3 layers on 2 pp ranks: 1 + 2, as NxD's create_partitions
    (4, 2, 4, True, True, True, "safetensors", 4),
    (8, 1, 4, True, False, True, "sharded", 4),
    (8, 2, 4, True, True, False, "safetensors", 4),
    (1, 2, 1, False, False, True, "safetensors", 4),
    (2, 1, 1, False, False, False, "sharded", 4),
]


@pytest.mark.parametrize("tp,pp,mult,lin,fuse,xser,fmt,layers", CASES)
def test_round_trip_is_bit_exact(tmp_path, tp, pp, mult, lin, fuse, xser, fmt, layers):
    cfg = tiny_config(num_hidden_layers=layers)
    original = save_hf(cfg, tmp_path / "hf", fmt)
    hf_to_nxd(input=tmp_path / "hf", output=tmp_path / "nxd", tp_size=tp, pp_size=pp, kv_size_multiplier=mult,
              qkv_linear=lin, fuse_qkv=fuse, save_xser=xser, **QUIET)
    files = nxd_io.find_rank_files(tmp_path / "nxd")
    assert set(files) == {(t, p) for t in range(tp) for p in range(pp)}
    assert all(Path(str(f) + ".tensors").is_dir() == xser for f in files.values())
    # every rank file holds exactly the names and shapes nxd_param_shapes promises
    expected = nxd_param_shapes(cfg, tp, pp, mult, lin, fuse)
    for key, f in files.items():
        got = {k: tuple(v.shape) for k, v in nxd_io.load_rank_file(f).items()}
        assert got == expected[key]
    nxd_to_hf(input=tmp_path / "nxd", output=tmp_path / "back", max_shard_size="30KB", **QUIET)  # several shards
    if fmt in ("safetensors", "sharded"):  # save_pretrained wrote one; found through the NxD manifest's hf_input
        assert (tmp_path / "back" / "generation_config.json").is_file()
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1 and (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back = read_hf_dir(tmp_path / "back")
    assert set(back) == set(original)
    for k in original:
        assert back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]), k


def test_tied_embeddings_and_fused_mha_round_trip(tmp_path):
    cfg = tiny_config(num_key_value_heads=8, tie_word_embeddings=True)
    original = save_hf(cfg, tmp_path / "hf")
    hf_to_nxd(input=tmp_path / "hf", output=tmp_path / "nxd", tp_size=2, qkv_linear=False, fuse_qkv=True, **QUIET)
    rank0 = nxd_io.load_rank_file(nxd_io.rank_file(tmp_path / "nxd" / "model", 0, 0))
    assert "model.layers.0.self_attn.qkv_proj.weight" in rank0  # NxD's fused ColumnParallelLinear when heads == kv heads
    assert torch.equal(rank0["lm_head.weight"], original["model.embed_tokens.weight"][:64])
    sd = load_nxd_as_hf_state_dict(tmp_path / "nxd")
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_from_pretrained_gives_identical_logits_and_copies_tokenizer(tmp_path):
    cfg = tiny_config()
    save_hf(cfg, tmp_path / "hf")
    hf_to_nxd(input=tmp_path / "hf", output=tmp_path / "nxd", tp_size=4, pp_size=2, kv_size_multiplier=2, fuse_qkv=True, **QUIET)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    nxd_to_hf(input=tmp_path / "nxd", output=tmp_path / "back", tokenizer_dir=tmp_path / "tok", max_shard_size="40KB", **QUIET)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()  # from_pretrained reads our index
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    a = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False)


def test_llama3_8b_tp32_shapes_by_hand():
    shapes = nxd_param_shapes(LLAMA3_8B, tp_size=32, pp_size=1, kv_size_multiplier=4, qkv_linear=True, fuse_qkv=False)
    assert set(shapes) == {(r, 0) for r in range(32)}
    a, f = "model.layers.7.self_attn.", "model.layers.7.mlp."
    for r in (0, 13, 31):
        s = shapes[(r, 0)]
        assert s["model.embed_tokens.weight"] == (128256 // 32, 4096) == s["lm_head.weight"]
        assert s[a + "qkv_proj.weight_q"] == (4096 // 32, 4096)           # one q head of 128 rows
        assert s[a + "qkv_proj.weight_k"] == (8 * 128 * 4 // 32, 4096)    # one replicated kv head
        assert s[a + "qkv_proj.weight_v"] == (128, 4096)
        assert s[a + "o_proj.weight"] == (4096, 128)
        assert s[f + "gate_up_proj.weight"] == (2 * 14336 // 32, 4096)
        assert s[f + "down_proj.weight"] == (4096, 14336 // 32)
        assert s["model.layers.7.input_layernorm.weight"] == (4096,) == s["model.norm.weight"]
        assert len(s) == 1 + 32 * 8 + 2
    fused = nxd_param_shapes(LLAMA3_8B, 32, 1, 4, True, True)[(5, 0)]
    assert fused[a + "qkv_proj.weight_qkv"] == (128 * 3, 4096) and a + "qkv_proj.weight_q" not in fused
    pp4 = nxd_param_shapes(LLAMA3_8B, 32, 4, 4, True, False)
    assert "model.embed_tokens.weight" in pp4[(0, 0)] and "model.embed_tokens.weight" not in pp4[(0, 1)]
    assert "lm_head.weight" in pp4[(0, 3)] and "model.norm.weight" not in pp4[(0, 2)]
    assert {k.split(".")[2] for k in pp4[(3, 1)] if k.startswith("model.layers.")} == {str(i) for i in range(8, 16)}


def test_head_permutation_by_value(tmp_path):
    """Llama3-8B's head counts (32 q, 8 kv) on a tiny width: rank r gets q head 4*(r%8)+r//8, kv head r%8."""
    hd = 2
    cfg = tiny_config(hidden_size=64, num_attention_heads=32, num_key_value_heads=8, head_dim=hd, intermediate_size=64,
                      vocab_size=64, num_hidden_layers=1)
    save_hf(cfg, tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    a = "model.layers.0.self_attn."
    sd[a + "q_proj.weight"] = torch.arange(32).repeat_interleave(hd)[:, None].float().expand(-1, 64).clone()
    sd[a + "k_proj.weight"] = torch.arange(8).repeat_interleave(hd)[:, None].float().expand(-1, 64).clone()
    sd[a + "v_proj.weight"] = 100 + sd[a + "k_proj.weight"]
    sd[a + "o_proj.weight"] = torch.arange(32).repeat_interleave(hd)[None, :].float().expand(64, -1).clone()
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    hf_to_nxd(input=tmp_path / "hf", output=tmp_path / "nxd", tp_size=32, kv_size_multiplier=4, save_xser=False, **QUIET)
    for r in range(32):
        st = nxd_io.load_rank_file(nxd_io.rank_file(tmp_path / "nxd" / "model", r, 0))
        assert torch.all(st[a + "qkv_proj.weight_q"] == 4 * (r % 8) + r // 8)
        assert torch.all(st[a + "o_proj.weight"] == 4 * (r % 8) + r // 8)
        assert torch.all(st[a + "qkv_proj.weight_k"] == r % 8)
        assert torch.all(st[a + "qkv_proj.weight_v"] == 100 + r % 8)


@pytest.mark.parametrize("flags,message", [
    (["--tp-size", "3"], "num_attention_heads 8 is not divisible by tp_size 3"),
    (["--tp-size", "8"], "num_key_value_heads 2 x kv_size_multiplier 1 = 2 replicated kv heads cannot be split over tp_size 8: "
                         "set kv_size_multiplier to 4"),
    (["--tp-size", "2", "--kv-size-multiplier", "4"], "tp_size 2 is not divisible by kv_size_multiplier 4"),
    (["--tp-size", "2", "--kv-size-multiplier", "8"], "tp_size 2 is not divisible by kv_size_multiplier 8"),
    (["--tp-size", "8", "--kv-size-multiplier", "8"], "kv_size_multiplier 8 does not divide the 4 query heads per kv head"),
    (["--tp-size", "2", "--pp-size", "5"], "num_hidden_layers 4 is smaller than pp_size 5"),
    (["--tp-size", "4", "--no-qkv-linear"], "num_key_value_heads 2 is not divisible by tp_size 4 without qkv_linear"),
    (["--tp-size", "2", "--no-qkv-linear", "--kv-size-multiplier", "2"], "kv_size_multiplier 2 needs qkv_linear"),
])
def test_bad_geometry_exits_2_before_writing(tmp_path, capsys, flags, message):
    save_hf(tiny_config(), tmp_path / "hf")
    rc = main(["convert-checkpoint", "--from", "hf", "--to", "nxd", "--input", str(tmp_path / "hf"),
               "--output", str(tmp_path / "nxd"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "nxd").exists() and not list(tmp_path.glob(".nxd.partial-*"))


def test_vocab_not_divisible_is_reported(tmp_path, capsys):
    save_hf(tiny_config(vocab_size=130), tmp_path / "hf")
    rc = main(["convert-checkpoint", "--from", "hf", "--to", "nxd", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o"),
               "--tp-size", "4", "--kv-size-multiplier", "2"])
    assert rc == 2 and "vocab_size 130 is not divisible by tp_size 4" in capsys.readouterr().err


def test_config_must_match_checkpoint(tmp_path):
    save_hf(tiny_config(), tmp_path / "hf")
    (tmp_path / "other.json").write_text(tiny_config(intermediate_size=128).to_json_string())
    with pytest.raises(UserError, match=r"mlp.gate_proj.weight has shape \[96, 64\], the config says \[128, 64\]"):
        hf_to_nxd(input=tmp_path / "hf", output=tmp_path / "nxd", hf_config=tmp_path / "other.json", tp_size=2, **QUIET)


def test_boolean_flags_mean_what_they_say(tmp_path, capsys):
    """NxD's converter parses `--fuse_qkv False` as True; here --no-fuse-qkv is False."""
    save_hf(tiny_config(), tmp_path / "hf")
    common = ["convert-checkpoint", "--from", "hf", "--to", "nxd", "--input", str(tmp_path / "hf"), "--tp-size", "2"]
    assert main([*common, "--output", str(tmp_path / "a"), "--no-fuse-qkv", "--no-save-xser"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--fuse-qkv", "--save-xser"]) == 0
    a = nxd_io.load_rank_file(nxd_io.rank_file(tmp_path / "a" / "model", 1, 0))
    b = nxd_io.load_rank_file(nxd_io.rank_file(tmp_path / "b" / "model", 1, 0))
    assert "model.layers.0.self_attn.qkv_proj.weight_q" in a and "model.layers.0.self_attn.qkv_proj.weight_qkv" not in a
    assert "model.layers.0.self_attn.qkv_proj.weight_qkv" in b
    assert not (tmp_path / "a" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors").exists()
    assert (tmp_path / "b" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors").is_dir()
    # back conversion detects the layout; a flag that contradicts the files is an error, not a silent misread
    capsys.readouterr()
    rc = main(["convert-checkpoint", "--from", "nxd", "--to", "hf", "--input", str(tmp_path / "b"), "--output", str(tmp_path / "c"),
               "--no-fuse-qkv"])
    err = capsys.readouterr().err
    assert rc == 2 and "fuse_qkv=False was given" in err and "fuse_qkv=True" in err
    assert main(["convert-checkpoint", "--from", "nxd", "--to", "hf", "--input", str(tmp_path / "b"), "--output", str(tmp_path / "c"),
                 "--fuse-qkv", "--tp-size", "2", "--dtype", "bfloat16"]) == 0
    back = read_hf_dir(tmp_path / "c")
    assert back["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_rerun_is_a_noop_and_failures_leave_nothing(tmp_path, monkeypatch):
    save_hf(tiny_config(), tmp_path / "hf")
    out = tmp_path / "nxd"
    kw = dict(input=tmp_path / "hf", output=out, tp_size=2, kv_size_multiplier=1)
    # a run that dies half way leaves no output (and a SIGKILLed run's staging dir is swept next time)
    real_write, calls = nxd_io.write_rank_file, []

    def dying_write(path, state, xser):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, state, xser)

    monkeypatch.setattr(nxd_io, "write_rank_file", dying_write)
    with pytest.raises(OSError):
        hf_to_nxd(**kw, **QUIET)
    assert not out.exists() and not list(tmp_path.glob(".nxd.partial-*"))
    monkeypatch.setattr(nxd_io, "write_rank_file", real_write)
    (tmp_path / ".nxd.partial-99999").mkdir()  # as if a run had been killed
    hf_to_nxd(**kw, **QUIET)
    assert not list(tmp_path.glob(".nxd.partial-*"))
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    logs: list[str] = []
    hf_to_nxd(**kw, log=logs.append)
    assert "up to date" in logs[0] and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    # a missing output file makes it stale again; so does a changed setting
    os.remove(nxd_io.rank_file(out / "model", 1, 0))
    hf_to_nxd(**kw, **QUIET)
    assert nxd_io.rank_file(out / "model", 1, 0).is_file()
    hf_to_nxd(**{**kw, "kv_size_multiplier": 2}, **QUIET)
    assert nxd_io.load_rank_file(nxd_io.rank_file(out / "model", 0, 0))["model.layers.0.self_attn.qkv_proj.weight_k"].shape[0] == 16
    # a directory we did not write is not replaced without --overwrite
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by convert-checkpoint"):
        hf_to_nxd(**{**kw, "output": tmp_path / "foreign"}, **QUIET)
    hf_to_nxd(**{**kw, "output": tmp_path / "foreign"}, overwrite=True, **QUIET)
    assert not (tmp_path / "foreign" / "notes.txt").exists()


FAKE_XSER = '''
import os, torch
class TensorReference(object):
    def __init__(self, tid):
        self.tid = tid
def save_cpu(data, path):  # what torch_xla's xser.save + NxD's trainer produce, minus the device
    os.makedirs(path + ".tensors", exist_ok=True)
    refs = {}
    for i, (k, v) in enumerate(data.items()):
        torch.save(v, os.path.join(path + ".tensors", "tensor_%d.pt" % i))
        refs[k] = TensorReference(i)
    torch.save(refs, path)
def load(path):
    refs = torch.load(path, weights_only=False)
    return {k: torch.load(os.path.join(path + ".tensors", "tensor_%d.pt" % v.tid)) if type(v) is TensorReference else v
            for k, v in refs.items()}
'''


def test_xser_files_match_torch_xla_names(tmp_path):
    """Our xser files load through (a stand-in of) torch_xla's xser.load, and its files load here."""
    pkg = tmp_path / "fake" / "torch_xla" / "utils"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "serialization.py").write_text(FAKE_XSER)
    ours = tmp_path / "ours.pt"
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    nxd_io.write_rank_file(ours, state, xser=True)
    info = torch.load(str(ours) + ".info.pt", weights_only=True)
    assert info[0] == {"dtype": torch.float32, "shape": torch.Size([3, 4]), "expert_model_parallel": False}
    script = textwrap.dedent(f"""
        import torch, torch_xla.utils.serialization as xser
        got = xser.load({str(ours)!r})
        want = {{"a.weight": torch.load({str(ours)!r} + ".tensors/tensor_0.pt"), "b": torch.load({str(ours)!r} + ".tensors/tensor_1.pt")}}
        assert list(got) == ["a.weight", "b"] and all(torch.equal(got[k], want[k]) for k in got)
        refs = torch.load({str(ours)!r}, weights_only=False)
        assert type(refs["b"]) is xser.TensorReference and refs["b"].tid == 1
        xser.save_cpu({{"x": torch.ones(2, 2), "y": torch.zeros(3)}}, {str(tmp_path / "theirs.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    assert torch.equal(nxd_io.load_rank_file(ours)["a.weight"], state["a.weight"])
    theirs = nxd_io.load_rank_file(tmp_path / "theirs.pt")
    assert torch.equal(theirs["x"], torch.ones(2, 2)) and torch.equal(theirs["y"], torch.zeros(3))


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llama3-8b-dpo.yaml"


def test_recipe_form_reads_parallel_settings_from_the_recipe(tmp_path, capsys):
    save_hf(tiny_config(), tmp_path / "hf")
    out = tmp_path / "ckpt"
    overrides = [f"runner.convert_checkpoint.input={tmp_path / 'hf'}", f"exp_manager.resume_from_checkpoint={out}",
                 f"model.model_config={tmp_path / 'hf' / 'config.json'}", "trainer.devices=4",
                 "distributed_strategy.tensor_model_parallel_size=4", "distributed_strategy.kv_replicator=2",
                 "model.fuse_qkv=true", "exp_manager.load_xser=false"]
    assert main(["convert-checkpoint", str(RECIPE), *overrides]) == 0
    files = nxd_io.find_rank_files(out)
    assert set(files) == {(t, 0) for t in range(4)} and not any(Path(str(f) + ".tensors").exists() for f in files.values())
    r0 = nxd_io.load_rank_file(files[(0, 0)])
    assert r0["model.layers.0.self_attn.qkv_proj.weight_qkv"].shape == (64 // 4 + 2 * 2 * 8 * 2 // 4, 64)
    capsys.readouterr()
    assert main(["convert-checkpoint", str(RECIPE), *overrides]) == 0
    assert "up to date" in capsys.readouterr().out
    # an explicit flag wins over the recipe
    assert main(["convert-checkpoint", str(RECIPE), *overrides, "--no-fuse-qkv"]) == 0
    assert "model.layers.0.self_attn.qkv_proj.weight_q" in nxd_io.load_rank_file(files[(0, 0)])
    assert main(["convert-checkpoint", str(RECIPE), *overrides, "runner.convert_checkpoint=null"]) == 0
    assert "nothing to convert" in capsys.readouterr().out
