"""Turning Kubernetes pod, job and event status into plain words, for `recipe-runner watch`.

Pure functions over the kubernetes client's model objects (V1Pod, V1Job, CoreV1Event); nothing
here talks to a cluster, so every translation is testable from a recorded response. The point is
that a user whose run sits in Pending sees "no node has 16 free aws.amazon.com/neuron: is the
Neuron device plugin installed ...?" instead of having to read `kubectl describe`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Iterable

INIT_CONTAINERS = ("fetch", "prepare-data", "convert-checkpoint")
MAIN_CONTAINER = "trainer"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

_NEURON_HINT = "is the Neuron device plugin installed and are Trn1 nodes in the cluster?"
_RESOURCE_HINTS = {
    "aws.amazon.com/neuron": _NEURON_HINT,
    "aws.amazon.com/neuroncore": _NEURON_HINT,
    "aws.amazon.com/neurondevice": _NEURON_HINT,
    "vpc.amazonaws.com/efa": (
        "is the EFA device plugin (eks/aws-efa-k8s-device-plugin) installed and do the nodes have "
        "EFA interfaces (8 on trn1.32xlarge, 16 on trn1n.32xlarge)?"
    ),
    "cpu": "lower the request or add bigger nodes",
    "memory": "lower the request or add bigger nodes",
}
# Taints every cluster has on its control plane; naming them would only be noise.
_ROUTINE_TAINTS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
_IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


@dataclass
class ContainerState:
    """What one container is doing, reduced to the few facts `watch` prints."""

    name: str
    state: str  # waiting | running | done | failed
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_reason: str = ""


def container_state(status) -> ContainerState:
    """V1ContainerStatus -> ContainerState."""
    result = ContainerState(name=status.name, state="waiting", restarts=status.restart_count or 0)
    state = status.state
    if state is not None and state.terminated is not None:
        t = state.terminated
        result.state = "done" if t.exit_code == 0 else "failed"
        result.exit_code, result.reason, result.message = t.exit_code, t.reason or "", t.message or ""
    elif state is not None and state.running is not None:
        result.state = "running"
    elif state is not None and state.waiting is not None:
        result.reason, result.message = state.waiting.reason or "", state.waiting.message or ""
    last = status.last_state.terminated if status.last_state is not None else None
    if last is not None:
        result.last_exit_code, result.last_reason = last.exit_code, last.reason or ""
    return result


def init_states(pod) -> list[ContainerState]:
    """The pod's init containers in spec order; ones without a status yet count as waiting."""
    statuses = {s.name: s for s in (pod.status.init_container_statuses or [])} if pod.status else {}
    names = [c.name for c in (pod.spec.init_containers or [])] if pod.spec else list(statuses)
    return [container_state(statuses[n]) if n in statuses else ContainerState(n, "waiting") for n in names]


def main_states(pod) -> list[ContainerState]:
    statuses = {s.name: s for s in (pod.status.container_statuses or [])} if pod.status else {}
    names = [c.name for c in (pod.spec.containers or [])] if pod.spec else list(statuses)
    return [container_state(statuses[n]) if n in statuses else ContainerState(n, "waiting") for n in names]


def completion_index(pod) -> str | None:
    """The pod's Indexed-Job completion index (label on k8s >= 1.28, annotation before)."""
    meta = pod.metadata
    for source in (meta.labels or {}, meta.annotations or {}):
        if COMPLETION_INDEX in source:
            return str(source[COMPLETION_INDEX])
    return None


def pod_summary(pod) -> str:
    """One line: pod name, rank, phase, and where each init container and the trainer stand."""
    index = completion_index(pod)
    phase = (pod.status.phase if pod.status else None) or "Unknown"
    head = f"pod {pod.metadata.name}" + (f" (rank {index})" if index is not None else "") + f": {phase}"
    if pod.status is None or not (pod.status.init_container_statuses or pod.status.container_statuses):
        return head + (" (not scheduled yet)" if phase == "Pending" and not pod.spec.node_name else "")
    parts = []
    inits = init_states(pod)
    if inits:
        parts.append("init " + ", ".join(f"{c.name} {_state_word(c)}" for c in inits))
    for c in main_states(pod):
        parts.append(f"{c.name} {_state_word(c)}")
    return head + (" | " + " | ".join(parts) if parts else "")


def _state_word(c: ContainerState) -> str:
    if c.state == "failed":
        return f"failed (exit {c.exit_code})"
    if c.state == "waiting" and c.reason and c.reason not in ("PodInitializing", "ContainerCreating"):
        return f"waiting ({c.reason})"
    return c.state


def _quantity(text) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity

    return Decimal(parse_quantity(text))


def pod_requests(pod) -> dict[str, str]:
    """Effective resource requests the scheduler uses: max(sum of containers, any init container).

    Limits stand in for requests where only limits are set (extended resources like
    aws.amazon.com/neuron are usually written as limits)."""

    def of(container) -> dict[str, Decimal]:
        res = container.resources
        if res is None:
            return {}
        values = dict(res.limits or {})
        values.update(res.requests or {})
        return {k: _quantity(v) for k, v in values.items()}

    total: dict[str, Decimal] = {}
    for c in pod.spec.containers or []:
        for k, v in of(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in pod.spec.init_containers or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return {k: (str(int(v)) if v == v.to_integral_value() else str(v)) for k, v in total.items()}


def _claims(pod) -> list[str]:
    return [v.persistent_volume_claim.claim_name for v in (pod.spec.volumes or []) if v.persistent_volume_claim]


def explain_scheduling(message: str, pod, pvc_phase: Callable[[str], str | None] | None = None) -> list[str]:
    """A FailedScheduling / Unschedulable message -> plain-words reasons, each with what to check.

    `pvc_phase(name)` returns a claim's phase, None when it does not exist, or "" when it could
    not be read; it lets the PVC message name the claim that is actually unbound."""
    text = message.split("preemption:")[0]
    reasons: list[str] = []
    requests = pod_requests(pod) if pod.spec else {}
    for resource in dict.fromkeys(r.rstrip(".") for r in re.findall(r"Insufficient ([\w./-]+)", text)):
        amount = requests.get(resource, "enough")
        hint = _RESOURCE_HINTS.get(resource, "is a node with that resource in the cluster?")
        reasons.append(f"no node has {amount} free {resource}: {hint}")
    taints = re.findall(r"untolerated taint\(?s?\)?\s*\{([^}]*)\}", text)
    taints += re.findall(r"had taints?\s*\{([^}]*)\},? that the pod didn't tolerate", text)
    for taint in dict.fromkeys(t.strip() for t in taints):
        key, _, value = taint.partition(":")
        if key.strip() in _ROUTINE_TAINTS:
            continue
        shown = key.strip() + (f"={value.strip()}" if value.strip() else "")
        reasons.append(
            f"nodes have taint {shown} that the pod does not tolerate: add a matching toleration "
            f"(for Neuron nodes: key aws.amazon.com/neuron, operator Exists, effect NoSchedule)"
        )
    if "node affinity/selector" in text or "didn't match node selector" in text:
        selector = ", ".join(f"{k}={v}" for k, v in ((pod.spec.node_selector or {}) if pod.spec else {}).items())
        reasons.append(
            "no node matches the pod's node selector/affinity"
            + (f" ({selector})" if selector else "")
            + ": are nodes of that instance type in the cluster (and is the node group scaled up)?"
        )
    if "unbound immediate PersistentVolumeClaims" in text or "unbound PersistentVolumeClaims" in text:
        reasons.extend(_pvc_reasons(pod, pvc_phase))
    for name in re.findall(r'persistentvolumeclaim "([^"]+)" not found', text):
        reasons.append(_missing_pvc(name, pod))
    if "volume node affinity conflict" in text:
        reasons.append(
            "the PVC's volume is in another availability zone than the free nodes: "
            "use a volume in the nodes' zone (FSx for Lustre file systems are per subnet)"
        )
    if "Too many pods" in text:
        reasons.append("the nodes are at their pod limit: add nodes or free some")
    if not reasons and message.strip():
        reasons.append(f"cannot be scheduled: {message.strip()}")
    return reasons


def _missing_pvc(name: str, pod) -> str:
    return (
        f"PVC {name} does not exist in namespace {pod.metadata.namespace}: create it there "
        "(a pod cannot use a PVC from another namespace) or fix the storage claim name in the values"
    )


def _pvc_reasons(pod, pvc_phase) -> list[str]:
    reasons = []
    claims = _claims(pod)
    for name in claims:
        phase = pvc_phase(name) if pvc_phase else ""
        if phase is None:
            reasons.append(_missing_pvc(name, pod))
        elif phase != "Bound":
            shown = f" (phase {phase})" if phase else ""
            reasons.append(f"PVC {name} not bound{shown}: check the StorageClass / FSx CSI driver")
    if not reasons:
        names = ", ".join(claims) or "of this pod"
        reasons.append(f"PVC {names} not bound: check the StorageClass / FSx CSI driver")
    return reasons


def explain_container(c: ContainerState, image: str | None = None) -> str | None:
    """A container state that needs the user's attention -> plain words; None when all is well."""
    if c.state == "waiting" and c.reason in _IMAGE_PULL:
        detail = f" ({c.message})" if c.message else ""
        return (
            f"container {c.name} cannot pull image {image or '?'}: {c.reason}{detail}. Check the image "
            "name and tag, that it was pushed, and that the nodes may pull it (ECR: the node role "
            "needs AmazonEC2ContainerRegistryReadOnly; other registries: imagePullSecrets)"
        )
    if c.state == "waiting" and c.reason == "CrashLoopBackOff":
        last = f", last exit code {c.last_exit_code}" if c.last_exit_code is not None else ""
        last += f" ({c.last_reason})" if c.last_reason else ""
        return f"container {c.name} keeps crashing (CrashLoopBackOff, {c.restarts} restarts{last})"
    if c.state == "waiting" and c.reason in ("CreateContainerConfigError", "CreateContainerError"):
        return f"container {c.name} cannot start: {c.message or c.reason} (a missing Secret, ConfigMap or key?)"
    if c.state == "failed":
        if c.reason == "OOMKilled":
            return (
                f"container {c.name} ran out of memory (OOMKilled, exit {c.exit_code}): raise its memory "
                "limit; on Trainium also set MALLOC_ARENA_MAX (e.g. 64) before torchrun"
            )
        reason = f", {c.reason}" if c.reason else ""
        message = f": {c.message.strip()}" if c.message.strip() else ""
        return f"container {c.name} failed (exit code {c.exit_code}{reason}){message}"
    return None


def _event_time(event):
    return event.last_timestamp or event.event_time or event.metadata.creation_timestamp


def explain_pending(pod, events: Iterable, pvc_phase=None) -> list[str]:
    """Why a pod is not running yet, from its PodScheduled condition, its warning events and
    its containers' waiting reasons."""
    reasons: list[str] = []
    scheduling = ""
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.message:
            scheduling = cond.message
    warnings = sorted((e for e in events if e.type == "Warning"), key=lambda e: str(_event_time(e) or ""))
    if not scheduling:
        failed = [e for e in warnings if e.reason == "FailedScheduling" and e.message]
        if failed:
            scheduling = failed[-1].message
    if scheduling:
        reasons.extend(explain_scheduling(scheduling, pod, pvc_phase))
    # The cluster autoscaler says whether a node is coming (events of type Normal).
    for e in sorted(events, key=lambda e: str(_event_time(e) or "")):
        if e.reason == "NotTriggerScaleUp" and e.message:
            reasons.append(f"the cluster autoscaler will not add a node: {e.message}")
        elif e.reason == "TriggeredScaleUp" and e.message:
            reasons.append(f"the cluster autoscaler is adding a node: {e.message}")
    for e in warnings:
        if e.reason in ("FailedMount", "FailedAttachVolume"):
            reasons.append(
                f"volume problem ({e.reason}): {e.message}; check the PVC and the FSx CSI driver "
                "(its node DaemonSet must tolerate the aws.amazon.com/neuron taint)"
            )
    images = {c.name: c.image for c in list(pod.spec.init_containers or []) + list(pod.spec.containers or [])}
    for c in init_states(pod) + main_states(pod):
        if c.state == "waiting":
            text = explain_container(c, images.get(c.name))
            if text:
                reasons.append(text)
    return list(dict.fromkeys(reasons))


@dataclass
class TrainingJob:
    """The release's training job, whichever launcher the chart used (batch Job or PyTorchJob)."""

    kind: str  # Job | PyTorchJob
    name: str
    created: str
    state: str  # running | complete | failed
    message: str = ""


def from_batch_job(job) -> TrainingJob:
    state, message = job_result(job)
    return TrainingJob("Job", job.metadata.name, str(job.metadata.creation_timestamp or ""), state, message)


def from_pytorchjob(obj: dict) -> TrainingJob:
    """A Kubeflow PyTorchJob (a plain dict from CustomObjectsApi): Succeeded / Failed conditions."""
    meta = obj.get("metadata") or {}
    state, message = "running", ""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Succeeded":
            state, message = "complete", cond.get("message") or ""
        elif cond.get("type") == "Failed":
            state, message = "failed", ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    return TrainingJob("PyTorchJob", meta.get("name", "?"), str(meta.get("creationTimestamp") or ""), state, message)


def job_result(job) -> tuple[str, str]:
    """('complete' | 'failed' | 'running', message) from the Job's conditions."""
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.status != "True":
            continue
        if cond.type == "Complete":
            return "complete", cond.message or ""
        if cond.type == "Failed":
            return "failed", ": ".join(x for x in (cond.reason, cond.message) if x)
    return "running", ""
