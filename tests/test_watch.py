"""`recipe-runner watch` against a fake Kubernetes API on loopback serving recorded responses.

The fake answers exactly the paths watch uses (jobs, pods, events, PVCs, pod logs) from the
JSON/text fixtures in tests/fixtures/k8s/; a route may hold a sequence of responses (the n-th
request gets the n-th, the last repeats) so a test can script a Job going Running -> Failed.
Label selectors and tailLines are honoured like the real API server, and a followed log is sent
with chunked transfer encoding like the real one. Every watch call has --timeout, and the
server streams from memory, so no test can hang.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from recipe_runner.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
NS = "train"
POD0 = "dpo-demo-trainer-0-7xk2p"
POD1 = "dpo-demo-trainer-1-q9m4d"


def fixture(name: str):
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else text


def _matches(obj: dict, selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    """Routes: path (with `?container=NAME` for logs) -> list of responses (dict, str, or (code, dict))."""

    def __init__(self, routes: dict):
        self.routes = {k: (v if isinstance(v, list) else [v]) for k, v in routes.items()}
        self.counts: dict[str, int] = {}
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def next_response(self, key: str):
        if key not in self.routes:
            return None
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        seq = self.routes[key]
        return seq[min(n, len(seq) - 1)]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append((url.path, query))
        key = url.path + (f"?container={query['container']}" if url.path.endswith("/log") else "")
        response = self.next_response(key)
        if response is None:
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                      "message": f"the server could not find the requested resource ({url.path})", "code": 404}
            return self.send_json(h, 404, status)
        if isinstance(response, tuple):
            return self.send_json(h, *response)
        if isinstance(response, str):  # a pod log
            lines = response.splitlines(keepends=True)
            if "tailLines" in query:
                n = int(query["tailLines"])
                lines = lines[-n:] if n > 0 else []
            if query.get("follow") == "true":
                return self.send_chunked(h, lines)
            return self.send_body(h, 200, "".join(lines).encode(), "text/plain")
        if "items" in response:  # filter lists like the API server: by namespace and labels
            parts = url.path.split("/")
            namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
            items = [i for i in response["items"] if namespace in (None, i["metadata"].get("namespace"))]
            items = [i for i in items if _matches(i, query.get("labelSelector", ""))]
            response = dict(response, items=items)
        return self.send_json(h, 200, response)

    @staticmethod
    def send_body(h, code: int, body: bytes, ctype: str) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def send_json(self, h, code: int, obj: dict) -> None:
        self.send_body(h, code, json.dumps(obj).encode(), "application/json")

    @staticmethod
    def send_chunked(h, lines: list[str]) -> None:
        """Like a followed log: chunks as lines are written, then the stream ends (container exit)."""
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(lines), 3):
            data = "".join(lines[i:i + 3]).encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
            time.sleep(0.01)
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
        h.close_connection = True


def kubeconfig(tmp_path: Path, port: int, namespace: str = NS) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n"
        "users:\n- name: tester\n  user:\n    token: not-a-real-token\n"
        f"contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: {namespace}\n"
        "current-context: fake\n"
    )
    return str(path)


def api(path: str) -> str:
    return f"/api/v1/namespaces/{NS}/{path}"


JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"


def watch(capsys, tmp_path, fake: FakeKube, *extra: str) -> tuple[int, str, str]:
    argv = ["watch", "dpo-demo", "--kubeconfig", kubeconfig(tmp_path, fake.port), "--interval", "0.05", "--timeout", "20", *extra]
    started = time.monotonic()
    code = main(argv)
    assert time.monotonic() - started < 20
    out, err = capsys.readouterr()
    return code, out, err


def test_pending_on_neuron_devices_is_explained(capsys, tmp_path):
    routes = {JOBS: fixture("jobs_running.json"), api("pods"): fixture("pods_pending_neuron.json"),
              api("events"): fixture("events_pending_neuron.json")}
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake, "--once")
    assert code == 0
    assert f"pod {POD0} (rank 0): Pending (not scheduled yet)\n" in out
    assert f"{POD0}: the cluster autoscaler will not add a node: pod didn't trigger scale-up: " in out
    assert ("no node has 16 free aws.amazon.com/neuron: is the Neuron device plugin installed and are "
            "Trn1 nodes in the cluster?") in out
    assert "no node has 8 free vpc.amazonaws.com/efa: is the EFA device plugin" in out
    assert "preemption" not in out  # the scheduler's preemption postscript is noise
    # one line per reason per pod, not one per poll or per event
    assert out.count(f"{POD0}: no node has 16 free aws.amazon.com/neuron") == 1


def test_pending_pod_is_followed_until_timeout(capsys, tmp_path):
    routes = {JOBS: fixture("jobs_running.json"), api("pods"): fixture("pods_pending_neuron.json"),
              api("events"): fixture("events_pending_neuron.json")}
    with FakeKube(routes) as fake:
        argv = ["watch", "dpo-demo", "--kubeconfig", kubeconfig(tmp_path, fake.port), "--interval", "0.05", "--timeout", "0.5"]
        code = main(argv)
        out = capsys.readouterr().out
        polls = sum(1 for path, _ in fake.requests if path == api("pods"))
    assert code == 3
    assert polls >= 3  # it kept polling ...
    assert out.count("Insufficient") == 0 and out.count("no node has 16 free aws.amazon.com/neuron") == 2  # ... quietly
    assert "still running after --timeout" in out


@pytest.mark.parametrize(
    "pvc, expected",
    [
        (fixture("pvc_fsx_claim_pending.json"), "PVC fsx-claim not bound (phase Pending): check the StorageClass / FSx CSI driver"),
        ((404, fixture("status_pvc_not_found.json")), "PVC fsx-claim does not exist in namespace train"),
    ],
)
def test_unbound_pvc_is_named(capsys, tmp_path, pvc, expected):
    routes = {JOBS: fixture("jobs_running.json"), api("pods"): fixture("pods_pending_pvc.json"),
              api("events"): fixture("events_empty.json"), api("persistentvolumeclaims/fsx-claim"): pvc}
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake, "--once")
    assert code == 0
    assert expected in out


def test_failing_init_container_shows_its_log_and_job_failure(capsys, tmp_path):
    routes = {
        JOBS: [fixture("jobs_running.json"), fixture("jobs_failed.json")],
        api("pods"): fixture("pods_init_failed.json"),
        api("events"): fixture("events_empty.json"),
        api(f"pods/{POD0}/log") + "?container=prepare-data": fixture("log_prepare_data.txt"),
    }
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake)
        log_requests = [q for p, q in fake.requests if p.endswith("/log")]
    assert code == 1
    assert f"pod {POD0} (rank 0): Failed | init fetch done, prepare-data failed (exit 2), convert-checkpoint waiting" in out
    assert "init container prepare-data failed (exit code 2, Error)" in out
    assert "last 15 log lines of prepare-data:" in out  # the file has 15 lines, fewer than 20
    assert "line 12417: key 'chosen' is missing" in out
    assert log_requests == [{"container": "prepare-data", "previous": "false", "tailLines": "20"}]  # fetched once, not per poll
    assert "job dpo-demo-trainer failed: BackoffLimitExceeded: Job has reached the specified backoff limit" in out
    assert out.index("prepare-data failed") < out.index("job dpo-demo-trainer failed")


def test_successful_run_streams_progress_and_exits_zero(capsys, tmp_path):
    routes = {
        JOBS: [fixture("jobs_running.json"), fixture("jobs_running.json"), fixture("jobs_complete.json")],
        api("pods"): [fixture("pods_running.json"), fixture("pods_succeeded.json")],
        api("events"): fixture("events_empty.json"),
        api(f"pods/{POD0}/log") + "?container=trainer": fixture("log_trainer.txt"),
    }
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake)
        log_requests = [(p, q) for p, q in fake.requests if p.endswith("/log")]
    assert code == 0
    assert f"pod {POD0} (rank 0): Running | init fetch done, prepare-data done, convert-checkpoint done | trainer running" in out
    # only rank 0's trainer log is followed, as a stream
    assert [p for p, _ in log_requests] == [api(f"pods/{POD0}/log")]
    assert log_requests[0][1]["follow"] == "true" and log_requests[0][1]["container"] == "trainer"
    lines = out.splitlines()
    step20 = next(line for line in lines if line.startswith("step 20/50"))
    assert step20 == ("step 20/50 (40%) | loss 0.6131 | rewards chosen +0.0240 rejected -0.0160 | margin +0.0400 | "
                      "acc 0.600 | 5.33 pairs/s | 43663 tokens/s | elapsed 0:15:02 | ETA 0:06:00")
    # 12 s/step measured between steps 10 and 40 -> 10 steps left = 2 minutes
    assert next(line for line in lines if line.startswith("step 40/50")).endswith("ETA 0:02:00")
    assert "validation @ step 30 | loss 0.5832 | rewards chosen +0.0301 rejected -0.0205 | margin +0.0506 | acc 0.812" in out
    assert "trainer: 2025-03-04 10:07:12.000123:  24113  INFO ||NEURON_CC_WRAPPER||: Compiling graph 1 of 4" in out
    assert "trainer: loading checkpoint /shared/checkpoints/llama3-8b-nxd" in out
    assert "some noisy line" not in out
    assert lines[-1].startswith("job dpo-demo-trainer complete: step 50/50 (100%) | loss 0.4931")


def test_finished_run_shows_its_last_progress(capsys, tmp_path):
    routes = {JOBS: fixture("jobs_complete.json"), api("pods"): fixture("pods_succeeded.json"),
              api(f"pods/{POD0}/log") + "?container=trainer": fixture("log_trainer.txt")}
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake)
    assert code == 0
    assert "step 50/50 (100%) | loss 0.4931" in out and "following" not in out
    assert out.splitlines()[-1].startswith("job dpo-demo-trainer complete: step 50/50 (100%)")


def test_job_deleted_after_success_is_not_a_typo(capsys, tmp_path):
    empty = {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []}
    routes = {JOBS: [fixture("jobs_running.json"), fixture("jobs_running.json"), empty],
              api("pods"): [fixture("pods_running.json"), fixture("pods_succeeded.json")],
              api(f"pods/{POD0}/log") + "?container=trainer": fixture("log_trainer.txt")}
    with FakeKube(routes) as fake:
        code, out, err = watch(capsys, tmp_path, fake)
    assert code == 0, err
    assert "job dpo-demo-trainer no longer exists" in out and "had finished" in out


def test_pytorchjob_launcher_failure_shows_trainer_log(capsys, tmp_path):
    """The chart's `launcher: pytorchjob` makes a Kubeflow PyTorchJob instead of a batch Job."""
    empty = {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []}
    routes = {
        JOBS: empty,
        f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs": fixture("pytorchjobs_failed.json"),
        api("pods"): fixture("pods_pytorchjob_failed.json"),
        api("pods/dpo-demo-trainer-master-0/log") + "?container=trainer": fixture("log_trainer_oom.txt"),
    }
    with FakeKube(routes) as fake:
        code, out, _ = watch(capsys, tmp_path, fake)
    assert code == 1
    assert "pod dpo-demo-trainer-master-0 (rank 0): Failed | init fetch done, prepare-data done, convert-checkpoint done | trainer failed (exit 1)" in out
    assert "container trainer failed (exit code 1, Error)" in out
    assert "RuntimeError: Failed to allocate 268435456 bytes on Neuron device 3: RESOURCE_EXHAUSTED" in out
    assert out.rstrip().endswith("job dpo-demo-trainer failed: PyTorchJobFailed: PyTorchJob train/dpo-demo-trainer is "
                                 "failed because 1 Master replica(s) failed.")


def test_unknown_release_lists_what_exists(capsys, tmp_path):
    routes = {JOBS: fixture("jobs_all_namespaces.json"), "/apis/batch/v1/jobs": fixture("jobs_all_namespaces.json")}
    with FakeKube(routes) as fake:
        argv = ["watch", "dpo-dmeo", "--kubeconfig", kubeconfig(tmp_path, fake.port), "--timeout", "5"]
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "no training job for release 'dpo-dmeo' in namespace train" in err
    assert "releases found there: orpo-8b" in err
    assert "dpo-demo (namespace ml-team)" in err


def test_namespace_flag_overrides_kubeconfig(capsys, tmp_path):
    routes = {"/apis/batch/v1/namespaces/other/jobs": {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []}}
    with FakeKube(routes) as fake:
        code = main(["watch", "dpo-demo", "-n", "other", "--kubeconfig", kubeconfig(tmp_path, fake.port), "--once"])
    assert code == 2
    assert "in namespace other" in capsys.readouterr().err


def test_missing_kubeconfig_is_a_user_error(capsys, tmp_path):
    code = main(["watch", "dpo-demo", "--kubeconfig", str(tmp_path / "nope"), "--once"])
    assert code == 2
    assert "kubeconfig" in capsys.readouterr().err


def test_unreachable_api_is_a_user_error(capsys, tmp_path):
    with FakeKube({}) as fake:
        port = fake.port
    # the server is closed now: nothing listens on that port
    code = main(["watch", "dpo-demo", "--kubeconfig", kubeconfig(tmp_path, port), "--once"])
    assert code == 2
    assert "cannot reach the Kubernetes API" in capsys.readouterr().err
