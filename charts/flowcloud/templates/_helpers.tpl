{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "flowcloud.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object: release-chart, or the release name when it contains the chart name. */}}
{{- define "flowcloud.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of a component's objects: fullname-component, within 63 characters. */}}
{{- define "flowcloud.componentName" -}}
{{- $full := include "flowcloud.fullname" .root }}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{- define "flowcloud.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component: {root, component}. */}}
{{- define "flowcloud.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowcloud.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels of a component's objects: {root, component}. */}}
{{- define "flowcloud.labels" -}}
helm.sh/chart: {{ include "flowcloud.chart" .root }}
{{ include "flowcloud.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: flowcloud
{{- end }}

{{/* Labels that mark a pod as a FlowCloud client of Redis (the NetworkPolicy admits these). */}}
{{- define "flowcloud.redisClientLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: flowcloud
{{- end }}

{{/* A label map as a label selector string: k1=v1,k2=v2 (sorted). */}}
{{- define "flowcloud.labelSelector" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}{{ $pairs = append $pairs (printf "%s=%s" $k $v) }}{{ end }}
{{- join "," $pairs }}
{{- end }}

{{/* The API's own ServiceAccount when the cluster view is on (the only one with Kubernetes API rights). */}}
{{- define "flowcloud.apiServiceAccountName" -}}
{{- if .Values.api.clusterView.enabled }}
{{- include "flowcloud.componentName" (dict "root" . "component" "api") }}
{{- else }}
{{- include "flowcloud.serviceAccountName" . }}
{{- end }}
{{- end }}

{{- define "flowcloud.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowcloud.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The FlowCloud service image; the tag defaults to the chart's appVersion. */}}
{{- define "flowcloud.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "flowcloud.workerImage" -}}
{{- if eq .Values.worker.mode "gpu" }}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- else }}
{{- include "flowcloud.image" . }}
{{- end }}
{{- end }}

{{/* Secret and key the services read FLOWCLOUD_REDIS_URL from. */}}
{{- define "flowcloud.redisUrlSecretName" -}}
{{- if .Values.redis.enabled }}
{{- include "flowcloud.componentName" (dict "root" . "component" "redis") }}
{{- else }}
{{- required "externalRedis.url.secretName is required when redis.enabled is false" .Values.externalRedis.url.secretName }}
{{- end }}
{{- end }}

{{- define "flowcloud.redisUrlSecretKey" -}}
{{- if .Values.redis.enabled }}redis-url{{ else }}{{ .Values.externalRedis.url.secretKey }}{{ end }}
{{- end }}

{{/* FLOWCLOUD_CONTROL_REDIS_URL from a Secret: the control plane (devices, API keys), for the services
that read it (gateway, API; the workers never do). */}}
{{- define "flowcloud.controlEnv" -}}
- name: FLOWCLOUD_CONTROL_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.controlRedis.enabled }}
      name: {{ include "flowcloud.componentName" (dict "root" . "component" "control-redis") }}
      key: redis-url
      {{- else }}
      name: {{ required "externalControlRedis.url.secretName is required when controlRedis.enabled is false" .Values.externalControlRedis.url.secretName }}
      key: {{ .Values.externalControlRedis.url.secretKey }}
      {{- end }}
{{- end }}


{{- define "flowcloud.adminKeySecretName" -}}
{{- default (include "flowcloud.componentName" (dict "root" . "component" "api")) .Values.api.adminKey.existingSecret }}
{{- end }}

{{/* Which worker autoscaler to render: keda, hpa or none. */}}
{{- define "flowcloud.autoscaler" -}}
{{- $a := .Values.worker.autoscaling }}
{{- if not $a.enabled }}none
{{- else if eq $a.engine "auto" }}
{{- if .Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject" }}keda{{ else }}hpa{{ end }}
{{- else }}{{ $a.engine }}
{{- end }}
{{- end }}

{{/* Environment every service shares: the data-plane Redis (URL from a Secret, cluster or not, frame
shards, and for an external Redis its password and CA), and the log level. */}}
{{- define "flowcloud.commonEnv" -}}
- name: FLOWCLOUD_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "flowcloud.redisUrlSecretName" . }}
      key: {{ include "flowcloud.redisUrlSecretKey" . }}
- name: FLOWCLOUD_REDIS_CLUSTER
  value: {{ include "flowcloud.redisCluster" . | quote }}
- name: FLOWCLOUD_FRAME_SHARDS
  value: {{ .Values.frameShards | quote }}
{{- if not .Values.redis.enabled }}
{{- with .Values.externalRedis.password.secretName }}
- name: FLOWCLOUD_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.externalRedis.password.secretKey }}
{{- end }}
{{- if .Values.externalRedis.ca.secretName }}
- name: FLOWCLOUD_REDIS_CA_FILE
  value: /etc/flowcloud/redis-ca/ca.crt
{{- end }}
{{- end }}
- name: FLOWCLOUD_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* "true" when the data plane is a Redis Cluster; refuses a cluster the chart cannot run itself. */}}
{{- define "flowcloud.redisCluster" -}}
{{- if .Values.redis.cluster.enabled }}
{{- if .Values.redis.enabled }}
{{- fail "redis.cluster.enabled needs an external Redis Cluster: the chart runs a single Redis only. Set redis.enabled=false and externalRedis.url (any node of the cluster), externalRedis.addresses (for KEDA)" }}
{{- end }}
{{- end }}
{{- ternary "true" "false" .Values.redis.cluster.enabled }}
{{- end }}

{{/* The external Redis's CA bundle (externalRedis.ca), mounted where FLOWCLOUD_REDIS_CA_FILE points:
the volume and the mount of every service that talks to the data-plane Redis. */}}
{{- define "flowcloud.redisCaVolume" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.ca.secretName }}
- name: redis-ca
  secret:
    secretName: {{ .Values.externalRedis.ca.secretName }}
    defaultMode: 0444
    items:
      - key: {{ .Values.externalRedis.ca.secretKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "flowcloud.redisCaMount" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.ca.secretName }}
- name: redis-ca
  mountPath: /etc/flowcloud/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{/* PromQL: frames waiting for a worker over all shards. Every worker reports each shard's group lag
(the same number), so take one value per shard (max) and add the shards up; the namespace and the
workers' metrics Service keep other releases out. */}}
{{- define "flowcloud.totalLagQuery" -}}
{{- $service := include "flowcloud.componentName" (dict "root" . "component" "worker-metrics") -}}
sum(max by (shard) (flowcloud_worker_consumer_lag{namespace="{{ .Release.Namespace }}",service="{{ $service }}"}))
{{- end }}

{{/* Pod-level security context (Pod Security Standards "restricted"). */}}
{{- define "flowcloud.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context (Pod Security Standards "restricted"). */}}
{{- define "flowcloud.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The writable /tmp every container gets (root filesystems are read-only). */}}
{{- define "flowcloud.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "flowcloud.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Render a settings map as FLOWCLOUD_<PREFIX>_<NAME> entries; empty strings are left out (defaults apply). */}}
{{- define "flowcloud.settingsData" -}}
{{- range $name, $value := .settings }}
{{- if not (and (kindIs "string" $value) (eq $value "")) }}
{{- /* whole numbers arrive as float64 and would print as 8e+06 */}}
{{- $v := $value }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}{{ $v = int64 $value }}{{ end }}
{{ printf "FLOWCLOUD_%s_%s" $.prefix (upper $name) }}: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}
