"""The pure parts of `watch`: progress-line parsing, ETA, and pod status in plain words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from recipe_runner.deploy import k8s_status as ks
from recipe_runner.deploy.progress import EtaEstimator, format_duration, parse_duration, parse_progress_line, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"


def load(kind: str, obj: dict):
    """Deserialize a dict into the client's model classes, as it does an API response (the public
    `deserialize` changed signature across client versions; the private one did not)."""
    return ApiClient()._ApiClient__deserialize(obj, kind)


def pending_pod():
    return load("V1PodList", json.loads((FIXTURES / "pods_pending_neuron.json").read_text())).items[0]


def test_parses_the_documented_line():
    line = ("step 10/200 | consumed_samples 40 | loss 0.6931 | chosen_rewards 0.0012 | rejected_rewards -0.0008 | "
            "reward_accuracy 0.750 | reward_margin 0.0020 | lr 5.00e-07 | grad_norm 1.23 | throughput 3.21 pairs/s | "
            "tokens/s 812 | elapsed 0:01:02")
    p = parse_progress_line(line)
    assert (p.step, p.max_steps, p.validation) == (10, 200, False)
    assert p.fields["lr"] == 5e-7 and p.fields["rejected_rewards"] == -0.0008 and p.fields["tokens/s"] == 812
    assert p.fields["throughput"] == 3.21 and p.units["throughput"] == "pairs/s"
    assert p.fields["elapsed"] == 62


def test_parses_orpo_validation_and_trainer_spellings():
    p = parse_progress_line("step 7/9 | reduced_train_loss 1.2500 | nll_loss 1.1000 | log_odds_ratio -0.3000 | "
                            "tokens_per_s 900 | elapsed 1 day, 1:00:00 | eta 0:00:20 | note warm-up")
    assert p.fields["nll_loss"] == 1.1 and p.fields["log_odds_ratio"] == -0.3
    assert p.fields["elapsed"] == 90000 and p.fields["eta"] == 20 and p.fields["note"] == "warm-up"
    text = summarize(p)
    assert "loss 1.2500 | nll 1.1000 | log_odds -0.3000" in text and "900 tokens/s" in text
    v = parse_progress_line("validation step 30 | val_loss 0.5832 | val_reward_accuracy 0.812")
    assert v.validation and v.step == 30 and v.max_steps is None
    assert summarize(v) == "validation @ step 30 | loss 0.5832 | acc 0.812"
    assert parse_progress_line("stepping into the void") is None
    assert parse_progress_line("2025 step 3/4 | loss 1") is None


def test_durations_round_trip():
    assert parse_duration("0:01:02") == 62 and parse_duration("12:30") == 750 and parse_duration("62.5s") == 62.5
    assert parse_duration("soon") is None
    assert format_duration(3723) == "1:02:03" and format_duration(90000) == "1d 1:00:00"


def test_eta_uses_step_rate_between_lines_not_compile_time():
    eta = EtaEstimator()
    first = parse_progress_line("step 10/110 | elapsed 0:20:00")  # 20 minutes of compile before step 10
    assert eta.update(first, now=0.0) == 100 * 120  # one line: elapsed/step, pessimistic
    # 10 steps in 50 s -> 5 s/step; 90 steps left
    assert eta.update(parse_progress_line("step 20/110 | elapsed 0:20:50"), now=1.0) == 450
    # without `elapsed`, the wall clock of arrival is used
    wall = EtaEstimator()
    wall.update(parse_progress_line("step 1/11"), now=100.0)
    assert wall.update(parse_progress_line("step 3/11"), now=104.0) == 16
    # one line with throughput: 64 samples per step at 4 pairs/s = 16 s/step
    assert EtaEstimator().update(parse_progress_line("step 10/12 | consumed_samples 640 | throughput 4.0"), 0) == 32
    assert EtaEstimator().update(parse_progress_line("step 12/12 | elapsed 0:01:00"), 0) is None


def test_insufficient_devices_are_explained_with_the_requested_amount():
    reasons = ks.explain_scheduling(
        "0/4 nodes are available: 1 Insufficient cpu, 3 Insufficient aws.amazon.com/neuron. preemption: "
        "0/4 nodes are available: 4 No preemption victims found for incoming pod.", pending_pod())
    assert reasons == [
        "no node has 120 free cpu: lower the request or add bigger nodes",
        "no node has 16 free aws.amazon.com/neuron: is the Neuron device plugin installed and are Trn1 nodes in the cluster?",
    ]


def test_requests_take_the_largest_init_container():
    # trainer asks 400Gi; convert-checkpoint (an init container) 128Gi; cpu: trainer 120 > any init
    requests = ks.pod_requests(pending_pod())
    assert requests["aws.amazon.com/neuron"] == "16" and requests["cpu"] == "120"
    assert requests["memory"] == str(400 * 2**30)


def test_taints_selectors_and_unknown_messages():
    pod = pending_pod()
    reasons = ks.explain_scheduling(
        "0/5 nodes are available: 2 node(s) had untolerated taint {aws.amazon.com/neuron: true}, "
        "1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
        "2 node(s) didn't match Pod's node affinity/selector.", pod)
    assert reasons[0].startswith("nodes have taint aws.amazon.com/neuron=true that the pod does not tolerate")
    assert "control-plane" not in " ".join(reasons)
    assert reasons[1].startswith("no node matches the pod's node selector/affinity (node.kubernetes.io/instance-type=trn1.32xlarge)")
    assert ks.explain_scheduling("0/1 nodes are available: 1 node(s) were unschedulable.", pod) == [
        "cannot be scheduled: 0/1 nodes are available: 1 node(s) were unschedulable."]


def test_image_pull_crash_loop_and_oom_in_plain_words():
    pull = ks.ContainerState("trainer", "waiting", reason="ImagePullBackOff",
                             message='Back-off pulling image "x.dkr.ecr.us-west-2.amazonaws.com/rr:0.2"')
    text = ks.explain_container(pull, "x.dkr.ecr.us-west-2.amazonaws.com/rr:0.2")
    assert text.startswith("container trainer cannot pull image x.dkr.ecr.us-west-2.amazonaws.com/rr:0.2: ImagePullBackOff")
    assert "imagePullSecrets" in text
    crash = ks.ContainerState("trainer", "waiting", reason="CrashLoopBackOff", restarts=4, last_exit_code=1, last_reason="Error")
    assert ks.explain_container(crash) == "container trainer keeps crashing (CrashLoopBackOff, 4 restarts, last exit code 1 (Error))"
    oom = ks.ContainerState("trainer", "failed", reason="OOMKilled", exit_code=137)
    assert "ran out of memory (OOMKilled, exit 137)" in ks.explain_container(oom) and "MALLOC_ARENA_MAX" in ks.explain_container(oom)
    assert ks.explain_container(ks.ContainerState("fetch", "running")) is None


def test_job_result_from_conditions():
    jobs = {name: load("V1JobList", json.loads((FIXTURES / f"jobs_{name}.json").read_text())).items[0]
            for name in ("running", "failed", "complete")}
    assert ks.job_result(jobs["running"]) == ("running", "")
    assert ks.job_result(jobs["failed"]) == ("failed", "BackoffLimitExceeded: Job has reached the specified backoff limit")
    assert ks.job_result(jobs["complete"])[0] == "complete"


def test_reads_the_trainers_own_progress_lines():
    """The contract with train/metrics.py: whatever it prints, watch reads back."""
    from recipe_runner.train.metrics import progress_line

    values = {"consumed_samples": 640, "reduced_train_loss": 0.6531, "chosen_rewards": 0.012, "rejected_rewards": -0.008,
              "reward_margin": 0.02, "reward_accuracy": 0.55, "lr": 5e-7, "gradient_norm": 1.4, "throughput": 5.33,
              "tokens_per_s": 43663.0}
    p = parse_progress_line(progress_line(10, 50, values, elapsed=782.0, eta=480.0))
    assert (p.step, p.max_steps, p.validation) == (10, 50, False)
    for key, value in values.items():
        assert p.fields[key] == pytest.approx(value, rel=1e-3), key
    assert p.fields["elapsed"] == 782 and p.fields["eta"] == 480
    text = summarize(p, p.number("eta"))
    assert text.startswith("step 10/50 (20%) | loss 0.6531 | rewards chosen +0.0120 rejected -0.0080 | margin +0.0200 | acc 0.550")
    assert "5.33 pairs/s | 43663 tokens/s | elapsed 0:13:02 | ETA 0:08:00" in text
    v = parse_progress_line(progress_line(30, 50, {"val_loss": 0.5832, "val_reward_accuracy": 0.8125}, 900.0, None, prefix="val_"))
    assert v.validation and v.step == 30
    assert summarize(v) == "validation @ step 30 | loss 0.5832 | acc 0.812"
