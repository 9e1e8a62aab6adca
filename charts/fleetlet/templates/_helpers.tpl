{{/*
Names. Every object name derives from "fleetlet.fullname", truncated to 63 characters (a DNS label). Component
names keep their suffix whole: the base is cut first (cert-manager's habit). The shim's StatefulSet name stays
within 52 characters, because its pods' controller-revision-hash label is "<name>-<10 characters>" and must fit
in 63.
*/}}
{{- define "fleetlet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetlet.fullname" -}}
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

{{/* "<fullname>-<suffix>" within `max` characters: (list . "suffix" max) */}}
{{- define "fleetlet.suffixed" -}}
{{- $ctx := index . 0 -}}{{- $suffix := index . 1 -}}{{- $max := index . 2 -}}
{{- $base := include "fleetlet.fullname" $ctx | trunc (int (sub $max (add1 (len $suffix)))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{- define "fleetlet.operator.fullname" -}}{{ include "fleetlet.suffixed" (list . "operator" 63) }}{{- end -}}
{{- define "fleetlet.shim.fullname" -}}{{ include "fleetlet.suffixed" (list . "shim" 52) }}{{- end -}}
{{- define "fleetlet.shim.headless" -}}{{ include "fleetlet.suffixed" (list . "shim-pods" 63) }}{{- end -}}
{{- define "fleetlet.sim.fullname" -}}{{ include "fleetlet.suffixed" (list . "sim" 63) }}{{- end -}}
{{- define "fleetlet.artifacts.claim" -}}
{{- .Values.artifacts.existingClaim | default (include "fleetlet.suffixed" (list . "artifacts" 63)) -}}
{{- end -}}

{{/* Secrets: the chart's own names, or those of secrets you made (certificates.source=existing). */}}
{{- define "fleetlet.secret.fleetCA" -}}
{{- if eq .Values.certificates.source "existing" -}}{{ required "certificates.existing.fleetCA is required with certificates.source=existing" .Values.certificates.existing.fleetCA }}{{- else -}}{{ include "fleetlet.suffixed" (list . "fleet-ca" 63) }}{{- end -}}
{{- end -}}
{{- define "fleetlet.secret.link" -}}
{{- if eq .Values.certificates.source "existing" -}}{{ required "certificates.existing.link is required with certificates.source=existing" .Values.certificates.existing.link }}{{- else -}}{{ include "fleetlet.suffixed" (list . "link-tls" 63) }}{{- end -}}
{{- end -}}
{{- define "fleetlet.secret.kubelet" -}}
{{- if eq .Values.certificates.source "existing" -}}{{ required "certificates.existing.kubeletApi is required with certificates.source=existing" .Values.certificates.existing.kubeletApi }}{{- else -}}{{ include "fleetlet.suffixed" (list . "kubelet-tls" 63) }}{{- end -}}
{{- end -}}
{{- define "fleetlet.secret.grantKey" -}}
{{- .Values.grantKey.existingSecret | default (include "fleetlet.suffixed" (list . "grant-key" 63)) -}}
{{- end -}}

{{/*
Labels: selector labels (immutable in a Deployment/StatefulSet: name, instance, component) apart from the
rest, which may change between chart versions. Call with (list . "component").
*/}}
{{- define "fleetlet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetlet.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "fleetlet.labels" -}}
{{- $ctx := index . 0 -}}
{{ include "fleetlet.selectorLabels" . }}
app.kubernetes.io/part-of: fleetlet
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $ctx.Chart.Name $ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fleetlet.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* In-cluster DNS names. */}}
{{- define "fleetlet.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}
{{- define "fleetlet.linkHost" -}}
{{- printf "%s.%s" (include "fleetlet.shim.fullname" .) (include "fleetlet.svcDomain" .) -}}
{{- end -}}
{{- define "fleetlet.replicaHost" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%v.%s.%s" (include "fleetlet.shim.fullname" $ctx) (index . 1) (include "fleetlet.shim.headless" $ctx) (include "fleetlet.svcDomain" $ctx) -}}
{{- end -}}

{{/* The car link URL of every shim replica (index = replica), for --replica-urls: cars are redirected there. */}}
{{- define "fleetlet.shim.replicaUrls" -}}
{{- $urls := list -}}
{{- if .Values.shim.link.replicaUrls -}}
{{- if ne (len .Values.shim.link.replicaUrls) (int .Values.shim.replicas) -}}
{{- fail (printf "shim.link.replicaUrls names %d URLs for %d replicas: give one per replica (index = replica)" (len .Values.shim.link.replicaUrls) (int .Values.shim.replicas)) -}}
{{- end -}}
{{- $urls = .Values.shim.link.replicaUrls -}}
{{- else -}}
{{- range $i := until (int .Values.shim.replicas) -}}
{{- $urls = append $urls (printf "wss://%s:%v/v1/link" (include "fleetlet.replicaHost" (list $ $i)) $.Values.shim.link.port) -}}
{{- end -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The DNS names on the link's serving certificate: the link Service, every replica's stable name, yours. */}}
{{- define "fleetlet.link.dnsNames" -}}
{{- $svc := include "fleetlet.shim.fullname" . -}}
{{- $headless := include "fleetlet.shim.headless" . -}}
{{- $names := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (include "fleetlet.linkHost" .) -}}
{{- $names = append $names (printf "*.%s.%s.svc" $headless .Release.Namespace) -}}
{{- $names = append $names (printf "*.%s.%s" $headless (include "fleetlet.svcDomain" .)) -}}
{{- concat $names .Values.certificates.link.dnsNames | uniq | toJson -}}
{{- end -}}

{{/* The restricted Pod Security profile, for the operator and the shim. */}}
{{- define "fleetlet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "fleetlet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Scheduling and metadata knobs every workload shares: (list . .Values.<component>) */}}
{{- define "fleetlet.podScheduling" -}}
{{- $v := index . 1 -}}
{{- with (index . 0).Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}
