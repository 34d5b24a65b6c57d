"""`recipe-runner watch RELEASE`: follow a Helm release's training Job until it ends.

Finds the release's trainer Job and pods by the chart's labels, says in plain words why a pod
is not running (scheduling, volumes, images, failing init containers with their last log
lines), then streams the rank-0 trainer log and condenses its progress lines into step / loss /
rewards / throughput / ETA. The exit code is the Job's result (0 Complete, 1 Failed), so a CI
script can `helm install ... && recipe-runner watch RELEASE`.

Exit codes: 0 Job Complete (or still running with --once), 1 Job Failed, 2 usage error or no
such release, 3 --timeout expired while the Job was still running.
"""

from __future__ import annotations

import argparse
import os
import time

from recipe_runner.deploy import k8s_status as ks
from recipe_runner.deploy.progress import EtaEstimator, is_pass_through, parse_progress_line, summarize
from recipe_runner.errors import UserError

INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
NAME = "app.kubernetes.io/name"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
EXIT_TIMEOUT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release", help="Helm release name (label app.kubernetes.io/instance)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--once", action="store_true", help="print the current state once and exit")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between status polls (default 10)")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
    parser.add_argument("--tail", type=int, default=200, help="earlier trainer log lines to read when starting (default 200)")
    parser.add_argument("--raw", action="store_true", help="print every trainer log line, not just progress")


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UserError(f"--interval must be positive, got {args.interval}")
    api, namespace = connect(args.kubeconfig, args.context, args.namespace)
    watcher = Watcher(api, namespace, args.release, tail=args.tail, raw=args.raw)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    return watcher.run(once=args.once, interval=args.interval, deadline=deadline)


def connect(kubeconfig: str | None, context: str | None, namespace: str | None):
    """(ApiClient, namespace) from a kubeconfig, or in-cluster credentials when
    there is no kubeconfig (watch running as a pod). A private Configuration keeps the client's
    global default untouched."""
    from kubernetes import client, config
    from kubernetes.config import kube_config

    cfg = client.Configuration()
    default_paths = [os.path.expanduser(p) for p in kube_config.KUBE_CONFIG_DEFAULT_LOCATION.split(os.pathsep) if p]
    if kubeconfig or any(os.path.exists(p) for p in default_paths):
        shown = kubeconfig or os.pathsep.join(default_paths)
        if kubeconfig and not os.path.exists(kubeconfig):
            raise UserError(f"kubeconfig {kubeconfig} does not exist: pass an existing file to --kubeconfig")
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg, persist_config=False)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except (config.ConfigException, OSError, ValueError) as e:
            raise UserError(
                f"cannot load kubeconfig {shown}: {e}. Fix the file, pick a context with --context, "
                "or create one with `aws eks update-kubeconfig --name CLUSTER`"
            ) from e
        chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
        namespace = namespace or ((chosen or {}).get("context") or {}).get("namespace") or "default"
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as e:
            raise UserError(
                "no kubeconfig found ($KUBECONFIG, ~/.kube/config) and not running inside a pod: pass "
                "--kubeconfig PATH or run `aws eks update-kubeconfig --name CLUSTER`"
            ) from e
        if not namespace and os.path.exists(SA_NAMESPACE_FILE):
            with open(SA_NAMESPACE_FILE) as f:
                namespace = f.read().strip()
        namespace = namespace or "default"
    return client.ApiClient(cfg), namespace


def _api_error(e: Exception, what: str) -> UserError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        if e.status in (401, 403):
            return UserError(f"the Kubernetes API refused to {what} ({e.status} {e.reason}): check your credentials and RBAC")
        return UserError(f"the Kubernetes API failed to {what}: {e.status} {e.reason}")
    return UserError(f"cannot reach the Kubernetes API to {what}: {e}. Is the cluster up and the kubeconfig current?")


class ReleaseNotFound(UserError):
    """No trainer job for the release (exit 2), told apart from API errors so that a job that
    vanishes mid-watch is not mistaken for a typo."""


def _created(obj):
    return str(obj.metadata.creation_timestamp or "")


class Watcher:
    """One watch session: polls the Job and its pods, prints what changed, follows rank 0."""

    def __init__(self, api, namespace: str, release: str, tail: int = 200, raw: bool = False, out=None):
        from kubernetes import client

        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.namespace, self.release = namespace, release
        self.selector = f"{INSTANCE}={release},{COMPONENT}={ks.MAIN_CONTAINER}"
        self.tail, self.raw = tail, raw
        self.out = out or (lambda text: print(text, flush=True))
        self.printed: set[str] = set()
        self.logs_shown: set[tuple] = set()
        self.follows: dict[str, int] = {}  # pod uid -> how many times its trainer log was followed
        self.eta = EtaEstimator()
        self.last_summary: str | None = None
        self.seen_job: str | None = None
        self.trainer_done = False  # rank 0's trainer exited 0 (the result if the Job is deleted)

    def say_once(self, text: str) -> None:
        if text not in self.printed:
            self.printed.add(text)
            self.out(text)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, once: bool = False, interval: float = 10.0, deadline: float | None = None) -> int:
        while True:
            try:
                job = self.find_job()
            except ReleaseNotFound:
                if self.seen_job is None:
                    raise
                self.out(f"job {self.seen_job} no longer exists (deleted, or removed by ttlSecondsAfterFinished); "
                         f"rank 0's trainer {'had finished' if self.trainer_done else 'had not finished'}")
                return 0 if self.trainer_done else 1
            self.seen_job = job.name
            pods = self.job_pods(job)
            self.describe(job, pods)
            rank0 = self.rank0(pods)
            if rank0 is not None:
                self.trainer_done = any(c.name == ks.MAIN_CONTAINER and c.state == "done" for c in ks.main_states(rank0))
            if job.state == "complete":
                if self.last_summary is None and rank0 is not None:  # finished before we looked
                    self.show_latest_progress(rank0)
                self.out(f"job {job.name} complete" + (f": {self.last_summary}" if self.last_summary else ""))
                return 0
            if job.state == "failed":
                self.out(f"job {job.name} failed: {job.message or 'no reason given'}")
                return 1
            if once:
                if rank0 is not None and self._trainer_started(rank0):
                    self.show_latest_progress(rank0)
                return 0
            if rank0 is not None and self._trainer_started(rank0) and self._should_follow(rank0):
                self.follow(rank0, deadline)
                interval_now = min(interval, 1.0)  # the Job's condition lags the container's end
            else:
                interval_now = interval
            if deadline is not None and time.monotonic() >= deadline:
                self.out(f"job {job.name} still running after --timeout; stopped watching")
                return EXIT_TIMEOUT
            time.sleep(interval_now if deadline is None else max(0.0, min(interval_now, deadline - time.monotonic())))

    def find_job(self) -> ks.TrainingJob:
        """The newest trainer Job of the release; a Kubeflow PyTorchJob when the chart's launcher
        is `pytorchjob` (looked for only when there is no batch Job)."""
        try:
            jobs = [ks.from_batch_job(j) for j in self.batch.list_namespaced_job(self.namespace, label_selector=self.selector).items]
        except Exception as e:
            raise _api_error(e, f"list jobs in namespace {self.namespace}") from e
        if not jobs:
            jobs = [ks.from_pytorchjob(j) for j in self.pytorchjobs(self.selector)]
        if not jobs:
            raise self.not_found()
        jobs.sort(key=lambda j: j.created)
        if len(jobs) > 1:
            names = ", ".join(j.name for j in jobs)
            self.say_once(f"release {self.release} has {len(jobs)} trainer jobs ({names}); watching the newest")
        return jobs[-1]

    def pytorchjobs(self, selector: str) -> list[dict]:
        try:
            found = self.custom.list_namespaced_custom_object("kubeflow.org", "v1", self.namespace, "pytorchjobs",
                                                              label_selector=selector)
        except Exception:
            return []  # no training operator in this cluster (404), or not allowed to look
        return list(found.get("items") or [])

    def not_found(self) -> ReleaseNotFound:
        """Which namespace was searched, and which releases exist, so a typo is a one-step fix."""
        label = f"{NAME}=recipe-runner,{COMPONENT}={ks.MAIN_CONTAINER}"
        here: list[str] = []
        elsewhere: list[str] = []
        try:
            here = sorted({(j.metadata.labels or {}).get(INSTANCE, "?") for j in self.batch.list_namespaced_job(self.namespace, label_selector=label).items})
            here = sorted(set(here) | {(j["metadata"].get("labels") or {}).get(INSTANCE, "?") for j in self.pytorchjobs(label)})
        except Exception:
            pass
        try:
            for j in self.batch.list_job_for_all_namespaces(label_selector=label).items:
                if j.metadata.namespace != self.namespace:
                    elsewhere.append(f"{(j.metadata.labels or {}).get(INSTANCE, '?')} (namespace {j.metadata.namespace})")
        except Exception:
            pass  # listing all namespaces is often forbidden; the namespace search is enough
        found = f"releases found there: {', '.join(here)}" if here else "no recipe-runner releases found there"
        if elsewhere:
            found += f"; in other namespaces: {', '.join(sorted(set(elsewhere)))}"
        return ReleaseNotFound(
            f"no training job for release {self.release!r} in namespace {self.namespace} (searched Jobs "
            f"labelled {self.selector}); {found}. Check the release name, or pass -n NAMESPACE"
        )

    def job_pods(self, job: ks.TrainingJob) -> list:
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        except Exception as e:
            raise _api_error(e, f"list pods in namespace {self.namespace}") from e
        def belongs(pod) -> bool:
            labels = pod.metadata.labels or {}
            owner = (labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
                     or labels.get("training.kubeflow.org/job-name"))
            return owner is None or owner == job.name

        pods = [p for p in pods if belongs(p)]
        pods.sort(key=lambda p: (ks.completion_index(p) or "", _created(p)))
        return pods

    @staticmethod
    def rank0(pods: list):
        """The pod whose trainer prints the metrics: completion index 0, newest attempt first."""
        candidates = [p for p in pods if ks.completion_index(p) == "0"] or [p for p in pods if ks.completion_index(p) is None]
        if not candidates:
            return None
        candidates.sort(key=lambda p: ((p.status.phase if p.status else "") != "Failed", _created(p)))
        return candidates[-1]

    @staticmethod
    def _trainer_started(pod) -> bool:
        return any(c.name == ks.MAIN_CONTAINER and c.state in ("running", "done", "failed") for c in ks.main_states(pod))

    def _should_follow(self, pod) -> bool:
        if pod.metadata.uid not in self.follows:
            return True
        # Followed before: only again if the stream dropped while the trainer still runs.
        return any(c.name == ks.MAIN_CONTAINER and c.state == "running" for c in ks.main_states(pod))

    # -- describing pods ------------------------------------------------------------------------

    def describe(self, job: ks.TrainingJob, pods: list) -> None:
        if not pods:
            self.say_once(f"job {job.name}: no pods yet")
            for e in self.events(job.kind, job.name):
                if e.type == "Warning":
                    self.say_once(f"  job {job.name}: {e.reason}: {e.message}")
            return
        for pod in pods:
            self.say_once(ks.pod_summary(pod))
            phase = pod.status.phase if pod.status else None
            if phase == "Pending":
                events = self.events("Pod", pod.metadata.name)
                for reason in ks.explain_pending(pod, events, self.pvc_phase):
                    self.say_once(f"  {pod.metadata.name}: {reason}")
            self.describe_failures(pod)

    def describe_failures(self, pod) -> None:
        """Failed or crash-looping containers: what happened and their last log lines."""
        images = {c.name: c.image for c in list(pod.spec.init_containers or []) + list(pod.spec.containers or [])}
        for c in ks.init_states(pod) + ks.main_states(pod):
            crash_loop = c.state == "waiting" and c.reason == "CrashLoopBackOff"
            if c.state != "failed" and not crash_loop:
                continue
            text = ks.explain_container(c, images.get(c.name))
            kind = "init container" if c.name in {x.name for x in ks.init_states(pod)} else "container"
            self.say_once(f"  {pod.metadata.name}: {kind} " + (text or c.name).removeprefix("container "))
            key = (pod.metadata.uid, c.name, c.restarts)
            if key in self.logs_shown:
                continue
            self.logs_shown.add(key)
            lines = self.log_tail(pod.metadata.name, c.name, previous=crash_loop)
            if lines:
                self.out(f"  last {len(lines)} log lines of {c.name}:")
                for line in lines:
                    self.out(f"    {line}")

    def events(self, kind: str, name: str) -> list:
        try:
            items = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
            ).items
        except Exception:
            return []  # events are a help, not a requirement (they may be forbidden or expired)
        return [e for e in items if e.involved_object is None or e.involved_object.name == name]

    def pvc_phase(self, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(name, self.namespace)
        except ApiException as e:
            return None if e.status == 404 else ""
        except Exception:
            return ""
        return (pvc.status.phase if pvc.status else "") or ""

    def log_tail(self, pod: str, container: str, previous: bool = False, lines: int = 20) -> list[str]:
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, tail_lines=lines, previous=previous)
        except Exception:
            return []
        return [line for line in (text or "").splitlines() if line.strip()][-lines:]

    # -- the trainer log ------------------------------------------------------------------------

    def on_log_line(self, line: str) -> None:
        line = line.rstrip("\r\n").split("\r")[-1]  # tqdm bars: keep the latest redraw only
        progress = parse_progress_line(line)
        if progress is not None:
            if progress.validation:
                self.out(summarize(progress))
            else:
                self.last_summary = summarize(progress, self.estimate(progress))
                self.out(self.last_summary)
        elif line.strip() and (self.raw or is_pass_through(line)):
            self.out(f"  trainer: {line}")

    def estimate(self, progress) -> float | None:
        """Seconds left: the trainer's own `eta` field when it prints one, else from the step rate."""
        eta = self.eta.update(progress, time.monotonic())
        own = progress.number("eta")
        return own if own is not None else eta

    def show_latest_progress(self, pod) -> None:
        """For --once: the newest progress line from the end of the trainer log."""
        for line in reversed(self.log_tail(pod.metadata.name, ks.MAIN_CONTAINER, lines=max(self.tail, 1))):
            progress = parse_progress_line(line.split("\r")[-1])
            if progress is not None and not progress.validation:
                self.last_summary = summarize(progress, self.estimate(progress))
                self.out(self.last_summary)
                return

    def follow(self, pod, deadline: float | None) -> None:
        """Stream the trainer log of `pod` until it ends, the connection drops, or the deadline."""
        uid = pod.metadata.uid
        first = uid not in self.follows
        self.follows[uid] = self.follows.get(uid, 0) + 1
        if first:
            self.out(f"following {pod.metadata.name} trainer log")
        read_timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            response = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, container=ks.MAIN_CONTAINER, follow=True,
                tail_lines=self.tail if first else 0, _preload_content=False, _request_timeout=(10, read_timeout),
            )
        except Exception as e:
            self.say_once(f"  cannot read the trainer log of {pod.metadata.name}: {e}")
            return
        buffer = b""
        try:
            for chunk in response.stream(4096):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.on_log_line(line.decode("utf-8", "replace"))
                if deadline is not None and time.monotonic() >= deadline:
                    return
            if buffer:
                self.on_log_line(buffer.decode("utf-8", "replace"))
        except Exception:
            pass  # a dropped or timed-out stream: the loop re-polls and follows again if still running
        finally:
            response.release_conn()
