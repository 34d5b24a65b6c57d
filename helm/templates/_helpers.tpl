{{/*
Shared pieces of the chart. "rr.run" computes every derived setting of the run once (and fails
on impossible combinations); the other templates read it with `include "rr.run" . | fromYaml`.
*/}}

{{- define "rr.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{/* Common labels (the chart <-> `recipe-runner watch` contract). Use with a dict {ctx, component}. */}}
{{- define "rr.labels" -}}
{{- $ctx := .ctx -}}
app.kubernetes.io/name: recipe-runner
app.kubernetes.io/instance: {{ $ctx.Release.Name | quote }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: recipe-runner
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $ctx.Chart.Name $ctx.Chart.Version | replace "+" "_" }}
recipe-runner/recipe: {{ $ctx.Values.recipe | trunc 63 | trimSuffix "-" | trimSuffix "." | quote }}
{{- end }}

{{- define "rr.selectorLabels" -}}
app.kubernetes.io/name: recipe-runner
app.kubernetes.io/instance: {{ .ctx.Release.Name | quote }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rr.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{- define "rr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "rr.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name }}
{{- end -}}
{{- end }}

{{- define "rr.claimName" -}}
{{- if .Values.storage.create -}}
{{ include "rr.fullname" . }}-shared
{{- else -}}
{{ .Values.storage.existingClaim }}
{{- end -}}
{{- end }}

{{/*
rr.run: the run's derived settings as YAML. Fails with a message that says what to change.
*/}}
{{- define "rr.run" -}}
{{- $v := .Values -}}
{{- $file := printf "recipes/%s.yaml" $v.recipe -}}
{{- $facts := .Files.Get $file | fromYaml -}}
{{- if not $facts.recipe -}}
{{- fail (printf "recipe %q is not in the chart (no helm/%s). Run `recipe-runner render recipes/%s.yaml` (or `make render`) to copy it in, or pick one of: %s" $v.recipe $file $v.recipe (include "rr.recipeNames" .)) -}}
{{- end -}}
{{- $devices := $v.devices | default $facts.devices | int -}}
{{- $nodes := $v.numNodes | default $facts.numNodes | int -}}
{{- range $o := $v.overrides -}}
{{- if or (hasPrefix "trainer.num_nodes=" $o) (hasPrefix "trainer.devices=" $o) -}}
{{- fail (printf "override %q: set the numNodes / devices values instead, so the number of pods and torchrun's process count follow it" $o) -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := $v.extraEnv -}}
{{- if regexMatch "(?i)(TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL)" $k -}}
{{- fail (printf "extraEnv.%s looks like a credential: values are stored in the release in plain text. Put it in a Secret and reference it (secrets.hfToken.secretName, secrets.envFrom) or use IRSA (serviceAccount.annotations)" $k) -}}
{{- end -}}
{{- end -}}
{{- if and (not $v.storage.create) (not $v.storage.existingClaim) -}}
{{- fail "no shared volume: set storage.existingClaim to a ReadWriteMany PVC (see k8s/prerequisites) or storage.create=true (with storage.storageClassName)" -}}
{{- end -}}
{{- if and (gt $nodes 1) (eq $v.storage.accessMode "ReadWriteOnce") -}}
{{- fail (printf "numNodes=%d needs a ReadWriteMany volume: the pods of one run share data, checkpoints and the compile cache (storage.accessMode is ReadWriteOnce)" $nodes) -}}
{{- end -}}
{{- $neuron := 0 -}}{{- $efa := 0 -}}{{- $cores := 0 -}}{{- $verified := true -}}
{{- if eq $v.profile "neuron" -}}
{{- $types := .Files.Get "instance-types.yaml" | fromYaml -}}
{{- $it := get $types $v.instanceType -}}
{{- if not $it -}}
{{- fail (printf "instanceType %q is unknown to the neuron profile; known: %s (add it to helm/instance-types.yaml), or use profile=cpu" $v.instanceType (keys $types | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $cores = int $it.neuronCores -}}
{{- $verified = $it.verified -}}
{{- if gt $devices $cores -}}
{{- fail (printf "devices=%d processes per node, but a %s has %d NeuronCores: lower trainer.devices (or the devices value) or use a larger instance type" $devices $v.instanceType $cores) -}}
{{- end -}}
{{- if eq $facts.device "cpu" "cuda" -}}
{{- fail (printf "recipe %s sets runner.device=%s, which the neuron profile cannot run: use profile=cpu or set runner.device to auto/xla" $v.recipe $facts.device) -}}
{{- end -}}
{{- $perDevice := div $cores (int $it.neuronDevices) -}}
{{- $neuron = div (add $devices $perDevice -1) $perDevice -}}
{{- if and $v.neuron.efa (eq (int $neuron) (int $it.neuronDevices)) -}}
{{- $efa = int $it.efa -}}
{{- end -}}
{{- if and (gt $nodes 1) (lt (int $neuron) (int $it.neuronDevices)) -}}
{{- fail (printf "numNodes=%d with devices=%d uses only part of each %s: multi-node runs take whole nodes (devices=%d)" $nodes $devices $v.instanceType $cores) -}}
{{- end -}}
{{- end -}}
{{- $job := printf "%s-r%d" (include "rr.fullname" .) (int .Release.Revision) -}}
{{- $mount := $v.storage.mountPath | trimSuffix "/" -}}
{{- $logDir := $v.run.logDir -}}
{{- if and (not $logDir) $facts.explicitLogDir (hasPrefix (printf "%s/" $mount) (toString $facts.explicitLogDir)) -}}
{{- $logDir = $facts.explicitLogDir -}}
{{- end -}}
{{- $logDir = $logDir | default (printf "%s/runs/%s" $mount .Release.Name) -}}
{{- $cacheDir := $v.neuron.compileCacheDir | default $facts.compilerCacheUrl | default (printf "%s/neuron-compile-cache" $mount) -}}
{{- $ovr := list (printf "exp_manager.explicit_log_dir=%s" $logDir) -}}
{{- if ne $devices (int $facts.devices) -}}{{- $ovr = append $ovr (printf "trainer.devices=%d" $devices) -}}{{- end -}}
{{- if ne $nodes (int $facts.numNodes) -}}{{- $ovr = append $ovr (printf "trainer.num_nodes=%d" $nodes) -}}{{- end -}}
{{- if and (eq $v.profile "cpu") (ne $facts.device "cpu") -}}{{- $ovr = append $ovr "runner.device=cpu" -}}{{- end -}}
{{- $ovr = concat $ovr $v.overrides -}}
recipeFile: {{ printf "/recipes/%s.yaml" $v.recipe | quote }}
devices: {{ $devices }}
numNodes: {{ $nodes }}
neuronDevices: {{ $neuron }}
neuronCores: {{ $cores }}
efa: {{ $efa }}
verified: {{ $verified }}
jobName: {{ $job | quote }}
serviceName: {{ include "rr.fullname" . | quote }}
logDir: {{ $logDir | quote }}
cacheDir: {{ $cacheDir | quote }}
compilerFlags: {{ $facts.compilerFlags | default "" | quote }}
inflight: {{ $v.neuron.asyncExecMaxInflightRequests | default $facts.asyncExecMaxInflightRequests | int }}
execTimeout: {{ $v.neuron.execTimeout | default $facts.neuronRtExecTimeout | int }}
overrides:
{{- range $ovr }}
  - {{ . | quote }}
{{- end }}
{{- end }}

{{- define "rr.recipeNames" -}}
{{- $names := list -}}
{{- range $path, $_ := .Files.Glob "recipes/*.yaml" -}}
{{- $names = append $names ($path | base | trimSuffix ".yaml") -}}
{{- end -}}
{{- $names | sortAlpha | join ", " -}}
{{- end }}

{{/* The recipe-runner arguments after the verb: recipe file + overrides, shell-quoted. */}}
{{- define "rr.shellArgs" -}}
{{- $run := . -}}
{{ $run.recipeFile | squote }}{{ range $run.overrides }} {{ . | squote }}{{ end }}
{{- end }}

{{/* The trainer's script: compile (no-op when the cache is warm), then train. */}}
{{- define "rr.trainScript" -}}
{{- $run := .run -}}
{{- $args := include "rr.shellArgs" $run -}}
{{- $v := .ctx.Values -}}
set -eu
recipe-runner compile {{ $args }}
{{- if and (eq (int $run.numNodes) 1) (eq (int $run.devices) 1) }}
exec recipe-runner train {{ $args }}
{{- else if eq (int $run.numNodes) 1 }}
exec torchrun --standalone --nnodes 1 --nproc_per_node {{ $run.devices }} -m recipe_runner.cli train {{ $args }}
{{- else if eq $v.launcher "pytorchjob" }}
exec torchrun --nproc_per_node {{ $run.devices }} --nnodes {{ $run.numNodes }} --node_rank "${RANK}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" -m recipe_runner.cli train {{ $args }}
{{- else }}
exec torchrun --nproc_per_node {{ $run.devices }} --nnodes {{ $run.numNodes }} --node_rank "${JOB_COMPLETION_INDEX}" --master_addr {{ printf "%s-0.%s" $run.jobName $run.serviceName }} --master_port {{ $v.job.masterPort }} -m recipe_runner.cli train {{ $args }}
{{- end }}
{{- end }}

{{/* Env shared by every container: run identity, credentials by reference, extra plain env. */}}
{{- define "rr.commonEnv" -}}
{{- $v := .ctx.Values -}}
- name: RECIPE_RUNNER_RELEASE
  value: {{ .ctx.Release.Name | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf-home" ($v.storage.mountPath | trimSuffix "/") | quote }}
{{- if $v.secrets.hfToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.hfToken.secretName }}
      key: {{ $v.secrets.hfToken.key }}
{{- end }}
{{- range $k, $val := $v.extraEnv }}
- name: {{ $k }}
  value: {{ $val | toString | quote }}
{{- end }}
{{- end }}

{{- define "rr.envFrom" -}}
{{- range .Values.secrets.envFrom }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{- define "rr.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The pod spec of a training pod (Indexed Job and PyTorchJob share it). Dict {ctx, run}. */}}
{{- define "rr.podSpec" -}}
{{- $ctx := .ctx -}}{{- $run := .run -}}{{- $v := $ctx.Values -}}
{{- $args := include "rr.shellArgs" $run -}}
{{- $image := include "rr.image" $ctx -}}
{{- $mount := $v.storage.mountPath | trimSuffix "/" -}}
restartPolicy: Never
{{- if include "rr.serviceAccountName" $ctx }}
serviceAccountName: {{ include "rr.serviceAccountName" $ctx }}
{{- end }}
{{- if eq $v.launcher "job" }}
subdomain: {{ $run.serviceName }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
  seccompProfile:
    type: RuntimeDefault
{{- if eq $v.profile "neuron" }}
nodeSelector:
  node.kubernetes.io/instance-type: {{ $v.instanceType | quote }}
  {{- with $v.nodeSelector }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
tolerations:
  - key: aws.amazon.com/neuron
    operator: Exists
    effect: NoSchedule
  {{- with $v.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- else }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
initContainers:
{{- range $verb := list "fetch" "prepare-data" "convert-checkpoint" }}
  - name: {{ $verb }}
    image: {{ $image | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command:
      - recipe-runner
      - {{ $verb }}
      - {{ $run.recipeFile | quote }}
      {{- range $run.overrides }}
      - {{ . | quote }}
      {{- end }}
    env:
      {{- include "rr.commonEnv" (dict "ctx" $ctx) | nindent 6 }}
    {{- with (include "rr.envFrom" $ctx) }}
    envFrom:
      {{- . | nindent 6 }}
    {{- end }}
    {{- $initRes := ternary $v.neuron.initResources $v.cpu.resources (eq $v.profile "neuron") }}
    resources:
      requests:
        {{- toYaml $initRes | nindent 8 }}
      limits:
        {{- toYaml $initRes | nindent 8 }}
    securityContext:
      {{- include "rr.containerSecurityContext" $ctx | nindent 6 }}
    volumeMounts:
      - name: recipe
        mountPath: /recipes
        readOnly: true
      - name: shared
        mountPath: {{ $mount }}
{{- end }}
containers:
  - name: trainer
    image: {{ $image | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command:
      - /bin/bash
      - -c
      - |
        {{- include "rr.trainScript" (dict "ctx" $ctx "run" $run) | nindent 8 }}
    {{- if and (eq $v.launcher "job") (gt (int $run.numNodes) 1) }}
    ports:
      - name: rendezvous
        containerPort: {{ $v.job.masterPort }}
    {{- end }}
    env:
      {{- include "rr.commonEnv" (dict "ctx" $ctx) | nindent 6 }}
      - name: MALLOC_ARENA_MAX
        value: {{ $v.neuron.mallocArenaMax | quote }}
      {{- if eq $v.profile "neuron" }}
      - name: NEURON_RT_NUM_CORES
        value: {{ $run.devices | quote }}
      - name: NEURON_CC_FLAGS
        value: {{ printf "%s --cache_dir=%s" $run.compilerFlags $run.cacheDir | trim | quote }}
      - name: NEURON_COMPILE_CACHE_URL
        value: {{ $run.cacheDir | quote }}
      - name: NEURON_FUSE_SOFTMAX
        value: {{ ternary "1" "0" $v.neuron.fuseSoftmax | quote }}
      - name: NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS
        value: {{ $run.inflight | quote }}
      - name: NEURON_RT_EXEC_TIMEOUT
        value: {{ $run.execTimeout | quote }}
      {{- if gt (int $run.efa) 0 }}
      - name: FI_PROVIDER
        value: efa
      - name: FI_EFA_USE_DEVICE_RDMA
        value: "1"
      - name: FI_EFA_FORK_SAFE
        value: "1"
      {{- end }}
      {{- else if $v.cpu.resources.cpu }}
      - name: OMP_NUM_THREADS
        value: {{ max 1 (div (include "rr.milliCpu" $v.cpu.resources.cpu | int) (mul 1000 (int $run.devices))) | quote }}
      {{- end }}
    {{- with (include "rr.envFrom" $ctx) }}
    envFrom:
      {{- . | nindent 6 }}
    {{- end }}
    resources:
      {{- include "rr.trainerResources" (dict "ctx" $ctx "run" $run) | nindent 6 }}
    securityContext:
      {{- include "rr.containerSecurityContext" $ctx | nindent 6 }}
    volumeMounts:
      - name: recipe
        mountPath: /recipes
        readOnly: true
      - name: shared
        mountPath: {{ $mount }}
      - name: dshm
        mountPath: /dev/shm
volumes:
  - name: recipe
    configMap:
      name: {{ include "rr.fullname" $ctx }}-recipe
  - name: shared
    persistentVolumeClaim:
      claimName: {{ include "rr.claimName" $ctx }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ ternary $v.neuron.shmSizeLimit $v.cpu.shmSizeLimit (eq $v.profile "neuron") }}
{{- end }}

{{/* Trainer requests == limits: Neuron devices and EFA per instance type, or cpu/memory. */}}
{{- define "rr.trainerResources" -}}
{{- $v := .ctx.Values -}}{{- $run := .run -}}
{{- $r := dict -}}
{{- if eq $v.profile "neuron" -}}
{{- $r = deepCopy $v.neuron.resources -}}
{{- $_ := set $r "aws.amazon.com/neuron" (int $run.neuronDevices) -}}
{{- if gt (int $run.efa) 0 }}{{- $_ := set $r "vpc.amazonaws.com/efa" (int $run.efa) -}}{{- end -}}
{{- else -}}
{{- $r = deepCopy $v.cpu.resources -}}
{{- end -}}
requests:
  {{- toYaml $r | nindent 2 }}
limits:
  {{- toYaml $r | nindent 2 }}
{{- end }}

{{/* A cpu quantity ("2", "500m", 4) in millicores, for OMP_NUM_THREADS. */}}
{{- define "rr.milliCpu" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}{{ trimSuffix "m" $q | int }}{{- else -}}{{ mulf (float64 $q) 1000 | int }}{{- end -}}
{{- end }}
