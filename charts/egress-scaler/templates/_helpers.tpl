{{/* The chart name, for app.kubernetes.io/name. */}}
{{- define "egress-scaler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: the release name when it contains the chart name. */}}
{{- define "egress-scaler.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels Helm adds to every object's metadata (never to selectors, which stay those of
deploy/, so that a Deployment applied with kustomize can be taken over). */}}
{{- define "egress-scaler.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Metadata labels of egress-scaler's own objects. */}}
{{- define "egress-scaler.labels" -}}
app.kubernetes.io/name: {{ include "egress-scaler.name" . }}
app.kubernetes.io/part-of: egress-scaler
{{ include "egress-scaler.helmLabels" . }}
{{- end -}}

{{/* Metadata labels of objects that belong to no one component (certificates, issuers). */}}
{{- define "egress-scaler.partOfLabels" -}}
app.kubernetes.io/part-of: egress-scaler
{{ include "egress-scaler.helmLabels" . }}
{{- end -}}

{{/* The selector of egress-scaler's pods. */}}
{{- define "egress-scaler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egress-scaler.name" . }}
{{- end -}}

{{/* Metadata labels of the objects about the egress fleet. */}}
{{- define "egress-scaler.egressLabels" -}}
{{ toYaml .Values.egress.podSelector }}
app.kubernetes.io/part-of: egress-scaler
{{ include "egress-scaler.helmLabels" . }}
{{- end -}}

{{- define "egress-scaler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "egress-scaler.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The gRPC Service's in-cluster name, the ScaledObject's scalerAddress host. */}}
{{- define "egress-scaler.grpcHost" -}}
{{- printf "%s-grpc.%s.svc.cluster.local" (include "egress-scaler.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The Redis URL built from redis.address or redis.sentinel; empty when neither is set.
$(REDIS_PASSWORD) and $(REDIS_SENTINEL_PASSWORD) are expanded by Kubernetes from the env
entries defined before it. */}}
{{- define "egress-scaler.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- $auth := "" -}}
{{- if $r.passwordSecret.name -}}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $r.username -}}
{{- else if $r.username -}}
{{- $auth = printf "%s@" $r.username -}}
{{- end -}}
{{- if $r.sentinel.masterName -}}
{{- $options := list (printf "wait_replicas=%d" (int $r.sentinel.waitReplicas)) -}}
{{- if $r.sentinel.username -}}
{{- $options = append $options (printf "sentinel_username=%s" $r.sentinel.username) -}}
{{- end -}}
{{- if $r.sentinel.passwordSecret.name -}}
{{- $options = append $options "sentinel_password=$(REDIS_SENTINEL_PASSWORD)" -}}
{{- end -}}
{{- printf "%s://%s%s/%s/%d?%s" (ternary "rediss+sentinel" "redis+sentinel" $r.tls) $auth (join "," $r.sentinel.addresses) $r.sentinel.masterName (int $r.db) (join "&" $options) -}}
{{- else if $r.address -}}
{{- printf "%s://%s%s/%d" (ternary "rediss" "redis" $r.tls) $auth $r.address (int $r.db) -}}
{{- end -}}
{{- end -}}

{{/* scaling.cost as KIND=CORES,KIND=CORES (sorted by kind). */}}
{{- define "egress-scaler.costs" -}}
{{- $pairs := list -}}
{{- range $kind, $cores := . -}}
{{- $pairs = append $pairs (printf "%s=%v" $kind $cores) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
