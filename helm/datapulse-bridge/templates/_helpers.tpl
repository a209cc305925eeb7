{{/* Names and labels. */}}
{{- define "datapulse-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "datapulse-bridge.fullname" -}}
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

{{- define "datapulse-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "datapulse-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "datapulse-bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "datapulse-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "datapulse-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "datapulse-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the API key: an existing one, or "<fullname>-api-key". */}}
{{- define "datapulse-bridge.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "datapulse-bridge.fullname" .)) .Values.api.existingSecret -}}
{{- end -}}

{{/* Where the pod sees its files. */}}
{{- define "datapulse-bridge.configPath" -}}/etc/datapulse-bridge/config/datapulse-bridge.toml{{- end -}}
{{- define "datapulse-bridge.apiKeyPath" -}}/etc/datapulse-bridge/secret/api-key{{- end -}}

{{/* "true" when the configuration needs Redis. */}}
{{- define "datapulse-bridge.usesRedis" -}}
{{- if or (eq .Values.rateBudget.mode "redis") (eq .Values.dedupe.store "redis") -}}true{{- end -}}
{{- end -}}
