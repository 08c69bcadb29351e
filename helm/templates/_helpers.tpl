{{- define "fwg.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fwg.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fwg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "fwg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "fwg.name" . }}
{{- end -}}

{{- define "fwg.selector" -}}
app.kubernetes.io/name: {{ include "fwg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A deployment id as a DNS label: lower case, [a-z0-9-], at most 40 characters. */}}
{{- define "fwg.workerName" -}}
{{- $id := regexReplaceAll "[^a-z0-9-]" (lower .id) "-" | trunc 40 | trimSuffix "-" -}}
{{- printf "%s-%s" (include "fwg.fullname" .root) $id | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The bundled Redis instances' names: `state` (registry, limits), `bulk` (usage records,
stored responses). */}}
{{- define "fwg.redisName" -}}
{{- printf "%s-redis%s" (include "fwg.fullname" .root) (ternary "" "-bulk" (eq .role "state")) -}}
{{- end -}}

{{- define "fwg.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "fwg.redisName" (dict "root" . "role" "state")) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* Where usage records and stored responses go; empty: with the registry (redisUrl). */}}
{{- define "fwg.redisBulkUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "fwg.redisName" (dict "root" . "role" "bulk")) -}}
{{- else -}}
{{- .Values.redis.bulkUrl -}}
{{- end -}}
{{- end -}}

{{/* The Secret with Redis' password (`password`): the bundled Redis' (made by the chart
unless redis.existingSecret), or an external one's (redis.existingSecret; none: no AUTH). */}}
{{- define "fwg.redisSecret" -}}
{{- default (printf "%s-redis" (include "fwg.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{/* A secret value the chart makes once: the entry `key` of the Secret `name` as the
cluster holds it, else 48 random characters (so an upgrade keeps it; `helm template` and a
first install make one). */}}
{{- define "fwg.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing (hasKey ($existing.data | default dict) .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}

{{- define "fwg.workerKeySecret" -}}
{{- default (printf "%s-worker-key" (include "fwg.fullname" .)) .Values.worker.apiKey.existingSecret -}}
{{- end -}}

{{- define "fwg.metricsKeySecret" -}}
{{- default (printf "%s-metrics-key" (include "fwg.fullname" .)) .Values.serviceMonitor.existingSecret -}}
{{- end -}}

{{- define "fwg.keysSecret" -}}
{{- default (printf "%s-keys" (include "fwg.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "fwg.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* A pod that runs as user `uid`, with the runtime's seccomp profile and no service-account
token (nothing in the chart talks to the Kubernetes API). */}}
{{- define "fwg.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid }}
  runAsGroup: {{ .uid }}
  fsGroup: {{ .uid }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* A container that cannot gain privileges, holds no capabilities and writes only to its
volumes. */}}
{{- define "fwg.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}
