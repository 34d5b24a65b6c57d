"""The Helm chart: lint, every recipe x profile x node count renders to objects Kubernetes accepts,
the run's wiring (resources, placement, init order, torchrun rendezvous, env, secrets, labels),
and clear failures for typos and impossible combinations."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from helm_support import (CHART, INSTANCE_TYPES, RECIPES, by_kind, env_of, helm, k8s_versions, one,
                          template, template_error, trainer, training_pod_spec, validate)

INIT_ORDER = ["fetch", "prepare-data", "convert-checkpoint"]
LABEL_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
              "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
              "helm.sh/chart"}


def script_lines(container: dict) -> list[str]:
    assert container["command"][:2] == ["/bin/bash", "-c"]
    return [line for line in container["command"][2].splitlines() if line.strip()]


def test_lint_strict():
    for extra in ([], ["--set", "recipe=tiny-dpo", "--set", "profile=cpu"],
                  ["--set", "launcher=pytorchjob", "--set", "numNodes=2", "--set", "tensorboard.enabled=true"]):
        proc = helm("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in proc.stdout


def test_recipes_in_chart_match_recipes_dir():
    # the chart holds a copy of every recipe in recipes/ (render keeps it fresh, test_render checks)
    in_repo = sorted(p.stem for p in (CHART.parent / "recipes").glob("*.yaml"))
    assert RECIPES == in_repo, "helm/recipes/ differs from recipes/: run `make render` and commit helm/ and k8s/"


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("profile", ["neuron", "cpu"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_profile_and_node_count_is_valid_kubernetes(recipe, profile, nodes):
    values = {"recipe": recipe, "profile": profile, "numNodes": nodes}
    if profile == "neuron" and nodes > 1:
        values["devices"] = 32  # multi-node runs take whole trn1 nodes
    objs = template(release=f"rel-{recipe.replace('.', '-')}", **values)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ConfigMap", "Service", "Job", "Pod", *(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] if profile == "neuron" else [])])
    for obj in objs:
        for version in k8s_versions():
            validate(obj, version)
        assert LABEL_KEYS <= set(obj["metadata"]["labels"]), obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "recipe-runner"

    job = one(objs, "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["initContainers"]] == INIT_ORDER
    recipe_file = f"/recipes/{recipe}.yaml"
    for c, verb in zip(spec["initContainers"], INIT_ORDER):
        assert c["command"][:3] == ["recipe-runner", verb, recipe_file]
    lines = script_lines(trainer(spec))
    assert lines[1].startswith(f"recipe-runner compile '{recipe_file}'")
    assert "train" in lines[2] and lines[2].startswith("exec ")
    # the recipe in the ConfigMap is the recipe file, byte for byte
    data = one(objs, "ConfigMap")["data"]
    assert data[f"{recipe}.yaml"] == (CHART.parent / "recipes" / f"{recipe}.yaml").read_text()


def test_default_install_is_llama3_dpo_on_trn1():
    objs = template(release="dpo-llama3")
    spec = training_pod_spec(objs)
    t = trainer(spec)
    assert spec["initContainers"][0]["command"][2] == "/recipes/llama3-8b-dpo.yaml"
    assert t["resources"]["requests"] == t["resources"]["limits"] == {
        "aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8}
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "trn1.32xlarge"}
    assert spec["tolerations"] == [{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}]
    env = env_of(t)
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1" and env["FI_EFA_FORK_SAFE"] == "1"
    assert env["NEURON_RT_NUM_CORES"] == "32"
    assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"  # the recipe's aync_exec_max_inflight_requests
    assert env["NEURON_RT_EXEC_TIMEOUT"] == "100"
    assert env["NEURON_FUSE_SOFTMAX"] == "1" and env["MALLOC_ARENA_MAX"] == "64"
    # the recipe's compiler flags and its compile cache on the shared volume
    assert env["NEURON_CC_FLAGS"] == "--model-type transformer --cache_dir=/shared/neuron_cache"
    # single node: torchrun standalone with the recipe's 32 processes
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 32" in script_lines(t)[2]
    # the recipe's explicit_log_dir is on the shared volume, so the chart keeps it
    assert "exp_manager.explicit_log_dir=/shared/runs/llama3-8b-dpo" in spec["initContainers"][0]["command"]
    shm = [v for v in spec["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert [v for v in spec["volumes"] if v["name"] == "shared"][0]["persistentVolumeClaim"] == {"claimName": "fsx-claim"}
    job = one(objs, "Job")
    assert job["metadata"]["name"] == "dpo-llama3-r1"  # .Release.Revision: helm upgrade makes a new Job
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["ttlSecondsAfterFinished"] == 259200


@pytest.mark.parametrize("instance_type", sorted(INSTANCE_TYPES))
def test_neuron_resources_follow_the_instance_type(instance_type):
    facts = INSTANCE_TYPES[instance_type]
    t = trainer(training_pod_spec(template(instanceType=instance_type, devices=facts["neuronCores"])))
    expected = {"aws.amazon.com/neuron": facts["neuronDevices"]}
    if facts["efa"]:
        expected["vpc.amazonaws.com/efa"] = facts["efa"]
    assert t["resources"]["requests"] == t["resources"]["limits"] == expected
    assert ("FI_PROVIDER" in env_of(t)) == bool(facts["efa"])


def test_partial_node_requests_devices_for_the_processes_and_no_efa():
    t = trainer(training_pod_spec(template(devices=8)))  # 8 NeuronCores = 4 trn1 devices
    assert t["resources"]["requests"] == {"aws.amazon.com/neuron": 4}
    assert "FI_PROVIDER" not in env_of(t)
    assert env_of(t)["NEURON_RT_NUM_CORES"] == "8"
    assert "trainer.devices=8" in script_lines(t)[1]  # the recipe is told, too


def test_trn1n_has_16_efa_and_efa_can_be_turned_off():
    t = trainer(training_pod_spec(template(instanceType="trn1n.32xlarge")))
    assert t["resources"]["limits"] == {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 16}
    t = trainer(training_pod_spec(template(**{"neuron.efa": False})))
    assert t["resources"]["limits"] == {"aws.amazon.com/neuron": 16}
    assert "FI_PROVIDER" not in env_of(t)


def test_cpu_profile_runs_anywhere():
    objs = template(recipe="tiny-dpo", profile="cpu", **{"storage.create": True, "storage.accessMode": "ReadWriteOnce"})
    spec = training_pod_spec(objs)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    t = trainer(spec)
    assert t["resources"]["requests"] == t["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    for c in spec["initContainers"]:
        assert c["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    env = env_of(t)
    assert not any(k.startswith(("NEURON_", "FI_")) for k in env)
    assert env["OMP_NUM_THREADS"] == "2"
    shm = [v for v in spec["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"]["sizeLimit"] == "1Gi"
    # one process: no torchrun; the recipe is told to use the cpu
    lines = script_lines(t)
    assert lines[2].startswith("exec recipe-runner train '/recipes/tiny-dpo.yaml'")
    assert "'runner.device=cpu'" in lines[2]
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in pvc["spec"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for version in k8s_versions():
        validate(pvc, version)


@pytest.mark.parametrize("profile", ["neuron", "cpu"])
def test_multi_node_rendezvous_on_index_0(profile):
    objs = template(release="big", recipe="llama3-8b-orpo", profile=profile, numNodes=4)
    job, svc = one(objs, "Job"), one(objs, "Service")
    spec = job["spec"]["template"]["spec"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert spec["subdomain"] == svc["metadata"]["name"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    train = shlex.split(script_lines(trainer(spec))[2])
    assert train[:2] == ["exec", "torchrun"]
    opts = dict(zip(train[2:12:2], train[3:12:2]))
    assert opts == {"--nproc_per_node": "32", "--nnodes": "4", "--node_rank": "${JOB_COMPLETION_INDEX}",
                    "--master_addr": f"{job['metadata']['name']}-0.{svc['metadata']['name']}", "--master_port": "41000"}
    assert train[12:16] == ["-m", "recipe_runner.cli", "train", "/recipes/llama3-8b-orpo.yaml"]
    assert "trainer.num_nodes=4" in train  # the recipe agrees with the pod count
    assert trainer(spec)["ports"] == [{"name": "rendezvous", "containerPort": 41000}]
    if profile == "neuron":
        assert trainer(spec)["resources"]["limits"]["vpc.amazonaws.com/efa"] == 8


def test_pytorchjob_launcher():
    objs = template(launcher="pytorchjob", numNodes=3)
    assert not by_kind(objs, "Job") and not by_kind(objs, "Service")
    pj = one(objs, "PyTorchJob")
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert replicas["Master"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"
    for role in ("Master", "Worker"):
        spec = replicas[role]["template"]["spec"]
        assert "subdomain" not in spec
        assert '--node_rank "${RANK}" --master_addr "${MASTER_ADDR}"' in script_lines(trainer(spec))[2]
        # no CRD schema in kubernetes-validate: validate the pod template as a Pod
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
        for version in k8s_versions():
            validate(pod, version)


def test_overrides_are_appended_to_every_command():
    spec = training_pod_spec(template(recipe="tiny-orpo", profile="cpu", overrides=["trainer.max_steps=10", "+a.b=c d"]))
    for c in spec["initContainers"]:
        assert c["command"][3:] == ["exp_manager.explicit_log_dir=/shared/runs/dpo-llama3", "runner.device=cpu",
                                    "trainer.max_steps=10", "+a.b=c d"]
    for line in script_lines(trainer(spec))[1:]:
        assert line.endswith("'runner.device=cpu' 'trainer.max_steps=10' '+a.b=c d'")


def test_log_dir_off_the_volume_moves_onto_it():
    # tiny recipes log under runs/ (relative): in the cluster that must be the shared volume
    spec = training_pod_spec(template(recipe="tiny-dpo", profile="cpu", **{"storage.mountPath": "/data"}))
    assert "exp_manager.explicit_log_dir=/data/runs/dpo-llama3" in spec["initContainers"][0]["command"]
    assert {"name": "shared", "mountPath": "/data"} in spec["initContainers"][0]["volumeMounts"]


def test_secrets_only_by_reference():
    objs = template(**{"secrets.hfToken.secretName": "hf-token", "secrets.envFrom": ["aws-creds"],
                       "extraEnv": {"NEURON_RT_LOG_LEVEL": "INFO"}, "tensorboard.enabled": True})
    for obj in objs:
        for spec in pod_specs(obj):
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", e["name"]):
                        assert "value" not in e, f"{c['name']}: plain value for {e['name']}"
                if obj["kind"] == "Job":
                    env = {e["name"]: e for e in c["env"]}
                    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
                    assert c["envFrom"] == [{"secretRef": {"name": "aws-creds"}}]
                    assert env["NEURON_RT_LOG_LEVEL"]["value"] == "INFO"


def test_service_account_for_irsa():
    arn = "arn:aws:iam::111122223333:role/recipe-runner"
    objs = template(**{"serviceAccount.create": True, "serviceAccount.annotations": {"eks.amazonaws.com/role-arn": arn}})
    sa = [o for o in by_kind(objs, "ServiceAccount") if "helm.sh/hook" not in o["metadata"].get("annotations", {})][0]
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": arn}
    assert training_pod_spec(objs)["serviceAccountName"] == sa["metadata"]["name"]


def pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    if obj["kind"] in ("Job", "Deployment"):
        return [obj["spec"]["template"]["spec"]]
    return []


def test_security_context_non_root():
    objs = template(**{"tensorboard.enabled": True})
    specs = [s for o in objs for s in pod_specs(o)]
    assert len(specs) == 3  # job, tensorboard, helm test
    for spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_tensorboard_reads_the_run_directory():
    objs = template(**{"tensorboard.enabled": True})
    dep = one(objs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["tensorboard", "--logdir", "/shared/runs/llama3-8b-dpo"]
    assert dep["metadata"]["labels"]["app.kubernetes.io/component"] == "tensorboard"
    svc = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-tensorboard")][0]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    for version in k8s_versions():
        validate(dep, version)
        validate(svc, version)


def test_helm_test_hook_checks_the_nodes():
    objs = template(numNodes=2)
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    script = pod["spec"]["containers"][0]["command"][2]
    assert "recipe-runner validate '/recipes/llama3-8b-dpo.yaml'" in script
    assert 'itype, need_nodes = "trn1.32xlarge", 2' in script
    assert '"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8' in script
    role = one(objs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]
    # the embedded python is valid python once the YAML block is read
    body = script.split("<<'PY'\n", 1)[1].split("\nPY", 1)[0]
    compile(body, "helm-test", "exec")
    cpu_pod = one(template(recipe="tiny-dpo", profile="cpu"), "Pod")
    assert "list_node" not in cpu_pod["spec"]["containers"][0]["command"][2]


def test_notes_say_how_to_follow_and_where_results_land():
    proc = helm("install", "dpo-llama3", str(CHART), "--dry-run=client", "--namespace", "ml",
                "--set", "tensorboard.enabled=true")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert ("kubectl logs -f -n ml -c trainer -l app.kubernetes.io/instance=dpo-llama3,"
            "app.kubernetes.io/component=trainer,batch.kubernetes.io/job-completion-index=0") in notes
    assert "recipe-runner watch dpo-llama3 -n ml" in notes
    assert "/shared/runs/llama3-8b-dpo" in notes and "fsx-claim" in notes
    assert "kubectl port-forward -n ml svc/dpo-llama3-tensorboard 6006" in notes
    assert "WARNING" not in notes
    assert "Note: image recipe-runner:0.1.0 has no registry" in notes
    pushed = helm("install", "x", str(CHART), "--dry-run=client", "--set", "image.repository=reg.example/rr").stdout
    assert "has no registry" not in pushed
    trn2 = helm("install", "x", str(CHART), "--dry-run=client", "--set", "instanceType=trn2.48xlarge").stdout
    assert "not\nverified" in trn2 or "not verified" in trn2


def test_schema_closes_every_object():
    # additionalProperties everywhere, so a typo anywhere in --set or a values file is an error;
    # only the Kubernetes affinity terms pass through (explicitly `true`)
    import json

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                assert "additionalProperties" in node, f"{path}: object without additionalProperties"
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    walk(schema, "")


@pytest.mark.parametrize("values, message", [
    ({"profle": "cpu"}, "additional properties 'profle' not allowed"),
    ({"storage.existingClam": "x"}, "additional properties 'existingClam' not allowed"),
    ({"profile": "gpu"}, "at '/profile': value must be one of 'neuron', 'cpu'"),
    ({"numNodes": 0}, "at '/numNodes': minimum: got 0, want 1"),
    ({"launcher": "mpi"}, "at '/launcher'"),
    ({"image.digest": "abc"}, "at '/image/digest'"),
    ({"extraEnv": {"BAD NAME": "x"}}, "invalid propertyName 'BAD NAME'"),
    ({"secrets.hfToken.value": "hf_xxx"}, "additional properties 'value' not allowed"),
    ({"overrides": ["trainer.max_steps='5'"]}, "at '/overrides/0'"),
    ({"job.backoffLimit": -1}, "at '/job/backoffLimit'"),
])
def test_schema_rejects_typos_and_bad_values(values, message):
    err = template_error(**values)
    assert "values don't meet the specifications of the schema" in err
    assert message in err, err


@pytest.mark.parametrize("values, message", [
    ({"instanceType": "trn9.huge"}, 'instanceType "trn9.huge" is unknown to the neuron profile; known: trn1.2xlarge, trn1.32xlarge'),
    ({"devices": 33}, "devices=33 processes per node, but a trn1.32xlarge has 32 NeuronCores"),
    ({"instanceType": "trn1.2xlarge"}, "devices=32 processes per node, but a trn1.2xlarge has 2 NeuronCores"),
    ({"storage.existingClaim": ""}, "no shared volume: set storage.existingClaim"),
    ({"recipe": "nope"}, 'recipe "nope" is not in the chart'),
    ({"overrides": ["trainer.num_nodes=2"]}, "set the numNodes / devices values instead"),
    ({"numNodes": 2, "storage.accessMode": "ReadWriteOnce"}, "numNodes=2 needs a ReadWriteMany volume"),
    ({"recipe": "tiny-dpo", "numNodes": 2}, "multi-node runs take whole nodes"),
    ({"extraEnv": {"HF_TOKEN": "hf_xxx"}}, "extraEnv.HF_TOKEN looks like a credential"),
])
def test_impossible_combinations_fail_clearly(values, message):
    assert message in template_error(**values)


def test_rendered_chart_objects_parse_as_yaml_documents():
    # guards against whitespace slips in templates that still parse into a wrong shape
    text = helm("template", "x", str(CHART), "--set", "recipe=tiny-dpo", "--set", "profile=cpu").stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
