"""Pod replay: the cpu-profile pod the chart renders, run on this machine.

The rendered pod spec is the test's script: its init containers' commands and then the trainer's
command run in order, as subprocesses with this venv's recipe-runner. A temp dir stands in for the
shared volume (storage.mountPath points at it), the ConfigMap's recipe is written to a temp
/recipes, and local files stand in for S3/HF (the `runner.sources` override). A second replay must
find everything prepared and do no preparation again, as a restarted pod would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helm_support import one, template, training_pod_spec, trainer

VERBS = {  # each verb of the pod and the module that must exist for the replay to run
    "fetch": "recipe_runner.prepare.fetch",
    "prepare-data": "recipe_runner.prepare.formats",
    "convert-checkpoint": "recipe_runner.prepare.convert",
    "compile": "recipe_runner.backends.compile",
    "train": "recipe_runner.train.commands",
}


def missing_verbs() -> list[str]:
    return [f"{verb} ({module})" for verb, module in VERBS.items() if importlib.util.find_spec(module) is None]


def render_pod(shared: Path) -> tuple[dict, str]:
    from recipe_runner.recipe import asset_path

    overrides = [
        "trainer.max_steps=4",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        f"runner.sources={{train_data: {{uri: {asset_path('tiny/train.jsonl')}, dest: {shared}/data/raw.jsonl}}}}",
        f"runner.prepare_data={{input: {shared}/data/raw.jsonl, format: preference, output: {shared}/data/train.jsonl}}",
        f"data.train_dir={shared}/data/train.jsonl",
    ]
    objs = template(release="replay", recipe="tiny-dpo", profile="cpu", overrides=overrides,
                    **{"storage.mountPath": str(shared)})
    recipe_text = one(objs, "ConfigMap")["data"]["tiny-dpo.yaml"]
    return training_pod_spec(objs), recipe_text


def replay(spec: dict, recipes_dir: Path) -> dict[str, str]:
    """Run the pod's containers in order; return each one's output. Fails on the first error."""
    venv_bin = str(Path(sys.executable).parent)
    outputs = {}
    steps = [(c["name"], c["command"], c.get("env", [])) for c in spec["initContainers"]]
    t = trainer(spec)
    steps.append((t["name"], t["command"], t.get("env", [])))
    for name, command, env_list in steps:
        env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
        env.update({e["name"]: e["value"] for e in env_list if "value" in e})
        command = [part.replace("/recipes/", f"{recipes_dir}/") for part in command]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        outputs[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"container {name} failed ({proc.returncode}):\n{outputs[name][-4000:]}"
    return outputs


@pytest.mark.slow
def test_cpu_pod_replays_to_a_trained_checkpoint_and_resumes_without_rework(tmp_path):
    missing = missing_verbs()
    if missing:
        pytest.skip(f"the pod's verbs are not all built yet: missing {', '.join(missing)}")
    shared = tmp_path / "shared"
    shared.mkdir()
    spec, recipe_text = render_pod(shared)
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    (recipes_dir / "tiny-dpo.yaml").write_text(recipe_text)
    assert [c["name"] for c in spec["initContainers"]] == ["fetch", "prepare-data", "convert-checkpoint"]

    first = replay(spec, recipes_dir)
    run_dir = shared / "runs" / "replay"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "reduced_train_loss" in m]
    assert train_rows and train_rows[-1]["step"] == 4, metrics[-3:]
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert checkpoints, "no checkpoint written"
    prepared = [shared / "data" / "raw.jsonl", shared / "data" / "train.jsonl"]
    mtimes = {p: p.stat().st_mtime_ns for p in prepared}
    assert "fetch: [train_data]" in first["fetch"]

    second = replay(spec, recipes_dir)
    assert "up to date" in second["fetch"] and "skipping" in second["fetch"], second["fetch"]
    assert "up to date" in second["prepare-data"] and "skipping" in second["prepare-data"], second["prepare-data"]
    assert {p: p.stat().st_mtime_ns for p in prepared} == mtimes
    assert "resumed from" in second["trainer"], second["trainer"][-2000:]
