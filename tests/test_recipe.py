"""Recipes: every recipe in recipes/ and the tutorial's YAML blocks validate; each class of bad
recipe gives one actionable message (file, line or override, key, fix) and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipe_runner.cli import main
from recipe_runner.errors import UserError
from recipe_runner.recipe import load_recipe
from recipe_runner.recipe.checks import not_used_on

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
FIXTURES = Path(__file__).parent / "fixtures"


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_recipes_present():
    names = {p.name for p in RECIPES}
    assert {"llama3-8b-dpo.yaml", "llama3-8b-orpo.yaml", "llama3.1-8b-dpo.yaml", "llama3.1-8b-orpo.yaml",
            "tiny-dpo.yaml", "tiny-orpo.yaml"} <= names


@pytest.mark.parametrize("block,base", [("seed_dpo_block.yaml", "llama3-8b-dpo.yaml"),
                                        ("seed_orpo_block.yaml", "llama3-8b-orpo.yaml")])
def test_seed_blocks_validate(block, base, tmp_path, capsys):
    """The tutorial's YAML blocks, unchanged, on top of the full NxDT recipe they belong to."""
    merged = deep_merge(yaml.safe_load((ROOT / "recipes" / base).read_text()),
                        yaml.safe_load((FIXTURES / block).read_text()))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(merged))
    r = load_recipe(path)
    assert r.exp_manager.resume_from_checkpoint == "/pretrained_ckpt"
    assert r.data.tokenizer.type == "/llama3_tokenizer"
    if "orpo" in block:
        assert r.algorithm == "orpo" and r.model.optim.lr == 1.5e-4 and r.model.encoder_seq_length == 4096
        assert "encoder_seq_len" in capsys.readouterr().out  # the tutorial's spelling, mapped with a note
    else:
        assert r.algorithm == "dpo" and r.alignment.kl_beta == 0.01 and r.alignment.precompute_ref_log_probs


def test_seed_values_and_interpolation():
    r = load_recipe(ROOT / "recipes/llama3-8b-dpo.yaml", ["trainer.max_steps=10"])
    assert r.model.optim.sched["max_steps"] == 10  # ${trainer.max_steps} sees the override
    assert r.exp_manager.checkpoint_callback_params.model_parallel_size == 32  # ${multiply:TP,PP}
    assert (r.data.global_batch_size, r.model.optim.lr, r.alignment.max_prompt_length) == (4, 5e-7, 2048)
    assert r.aync_exec_max_inflight_requests == 5
    orpo = load_recipe(ROOT / "recipes/llama3-8b-orpo.yaml")
    assert (orpo.data.global_batch_size, orpo.model.optim.sched["name"], orpo.alignment.beta) == (16, "CosineAnnealing", 0.1)
    assert orpo.exp_manager.checkpoint_callback_params.every_n_train_steps == 10


def test_legacy_nxdt_dpo_layout(tmp_path):
    """Older NxDT configs: data.alignment_strategy.dpo.max_dpo_prompt_length."""
    raw = yaml.safe_load((ROOT / "recipes/llama3-8b-dpo.yaml").read_text())
    raw.pop("model_alignment_strategy")
    raw["data"]["alignment_strategy"] = {"dpo": {"kl_beta": 0.1, "loss_type": "sigmoid", "max_dpo_prompt_length": 1024,
                                                 "precompute_ref_log_probs": True, "truncation_mode": "keep_start"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.algorithm == "dpo" and r.alignment.max_prompt_length == 1024 and r.alignment.kl_beta == 0.1


def run_bad(args, capsys) -> str:
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


DPO = str(ROOT / "recipes/llama3-8b-dpo.yaml")


@pytest.mark.parametrize("override,needles", [
    ("trainer.max_step=3", ["unknown key `trainer.max_step`", "did you mean `max_steps`"]),
    ("trainer.devices=many", ["`trainer.devices`", "integer"]),
    ("model_alignment_strategy.dpo.max_prompt_length=4096", ["max_prompt_length", "smaller than data.seq_length"]),
    ("data.global_batch_size=6 data.micro_batch_size=4", ["data.global_batch_size", "not divisible", "multiple of 4"]),
    ("distributed_strategy.tensor_model_parallel_size=5", ["tensor (5)", "must divide", "(32)"]),
    ("model_alignment_strategy.dpo.loss_type=bco", ["loss_type", "'sigmoid', 'hinge' or 'ipo'"]),
    ("model_alignment_strategy.dpo.truncation_mode=middle", ["truncation_mode", "'keep_start' or 'keep_end'"]),
    ("model.optim.sched.name=Cosine", ["sched.name", "unknown scheduler 'Cosine'", "CosineAnnealing"]),
    ("model.optim.sched.name=rprop", ["rprop", "optimizer"]),
    ("model.optim.sched.warmup_step=3", ["warmup_step", "did you mean `warmup_steps`"]),
    ("model.optim.name=sgd", ["model.optim.name", "adamw_fp32OptState"]),
    ("~data.train_dir", ["missing required key `data.train_dir`"]),
])
def test_bad_recipes(override, needles, capsys):
    err = run_bad([DPO, *override.split()], capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert "command-line override" in err or "llama3-8b-dpo.yaml:" in err


def test_error_names_file_and_line(tmp_path, capsys):
    text = (ROOT / "recipes/llama3-8b-dpo.yaml").read_text().replace("  log_every_n_steps: 10",
                                                                     "  log_every_n_step: 10")
    (tmp_path / "r.yaml").write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "log_every_n_step:" in l)
    err = run_bad([str(tmp_path / "r.yaml")], capsys)
    assert f"r.yaml:{line}: unknown key `trainer.log_every_n_step`: did you mean `log_every_n_steps`?" in err


def test_yaml_syntax_and_missing_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("trainer:\n  devices: [1\n")
    assert "not valid YAML" in run_bad([str(tmp_path / "bad.yaml")], capsys)
    assert "no such file" in run_bad([str(tmp_path / "none.yaml")], capsys)
    assert "expected key=value" in run_bad([DPO, "trainer.max_steps"], capsys)


def test_unused_keys_listed_per_device(capsys):
    assert main(["validate", DPO, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("not used on cpu:") == 1 and "compiler_flags" in out and "distributed_strategy.*" in out
    r = load_recipe(DPO, device="xla")
    xla = not_used_on(r, "xla")
    assert "compiler_flags" not in xla and "distributed_strategy.*" not in xla
    assert "trainer.num_sanity_val_steps" in xla  # PTL plumbing: read by no backend


def test_dynamic_padding_rejected_on_xla():
    with pytest.raises(UserError, match="dynamic padding"):
        load_recipe(ROOT / "recipes/tiny-dpo.yaml", ["runner.data.padding=dynamic"], device="xla")


def test_explicit_log_dir_is_the_run_dir(tmp_path):
    from recipe_runner.train.distributed import Dist
    from recipe_runner.train.provenance import resolve_run_dir

    r = load_recipe(ROOT / "recipes/tiny-dpo.yaml", [f"exp_manager.explicit_log_dir={tmp_path}/exact"])
    assert resolve_run_dir(r, Dist()) == tmp_path / "exact"
    r = load_recipe(ROOT / "recipes/tiny-dpo.yaml", [f"exp_manager.exp_dir={tmp_path}/exps"])
    assert resolve_run_dir(r, Dist()) == tmp_path / "exps" / "tiny-dpo" / "run"  # resume_if_exists: stable
