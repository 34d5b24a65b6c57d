"""The starting checkpoint may be a Hugging Face directory or the NxD layout `convert-checkpoint`
writes; both must give the same model. Recipe architecture keys must agree with config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipe_runner.errors import UserError
from recipe_runner.model.build import build_model, checkpoint_kind
from recipe_runner.prepare.convert import hf_to_nxd
from recipe_runner.recipe import asset_path, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/tiny-dpo.yaml"


def test_nxd_layout_start_equals_hf_start(tmp_path):
    hf_dir = asset_path("tiny/model")
    nxd_dir = tmp_path / "nxd"
    hf_to_nxd(input=hf_dir, output=nxd_dir, tp_size=2, pp_size=1, kv_size_multiplier=1)
    assert checkpoint_kind(str(nxd_dir)) == "nxd" and checkpoint_kind(hf_dir) == "hf"
    from_hf = build_model(load_recipe(TINY))
    from_nxd = build_model(load_recipe(TINY, [f"exp_manager.resume_from_checkpoint={nxd_dir}",
                                              "distributed_strategy.tensor_model_parallel_size=1"]))
    ids = torch.randint(5, from_hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_hf(ids).logits, from_nxd(ids).logits)


def test_architecture_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="model.num_layers is 3 but .*num_hidden_layers=2"):
        build_model(load_recipe(TINY, ["model.num_layers=3"]))


def test_missing_starting_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a Hugging Face model"):
        checkpoint_kind(str(tmp_path / "empty"))


def test_random_init_is_made_in_the_requested_dtype_and_checkpoints_load_in_fp32(capsys):
    random = build_model(load_recipe(TINY, ["exp_manager.resume_from_checkpoint=null"]), init_dtype=torch.bfloat16)
    assert {p.dtype for p in random.parameters()} == {torch.bfloat16}
    assert "random weights" in capsys.readouterr().out
    assert torch.get_default_dtype() == torch.float32  # restored
    loaded = build_model(load_recipe(TINY), init_dtype=torch.bfloat16)  # the init dtype is for random init only
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
