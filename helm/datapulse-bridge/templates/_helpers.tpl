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

{{/* Every object's labels: commonLabels, then the chart's own (which win on a clash). */}}
{{- define "datapulse-bridge.labels" -}}
{{- $own := dict "helm.sh/chart" (printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_") "app.kubernetes.io/version" .Chart.AppVersion "app.kubernetes.io/managed-by" .Release.Service -}}
{{- $own = merge $own (include "datapulse-bridge.selectorLabels" . | fromYaml) -}}
{{- toYaml (merge $own (deepCopy (.Values.commonLabels | default dict))) -}}
{{- end -}}

{{/*
An object's `annotations:` block: commonAnnotations merged with the object's own (given as "own",
which win on a clash); nothing when both are empty. Call with (dict "ctx" $ "own" MAP).
*/}}
{{- define "datapulse-bridge.annotations" -}}
{{- $all := merge (deepCopy (.own | default dict)) (deepCopy (.ctx.Values.commonAnnotations | default dict)) -}}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
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
{{- define "datapulse-bridge.kafkaPropertiesDir" -}}/etc/datapulse-bridge/kafka{{- end -}}
{{- define "datapulse-bridge.kafkaTlsDir" -}}/etc/datapulse-bridge/kafka-tls{{- end -}}

{{/*
Whether a librdkafka property holds a secret: the bridge's own rule (is_secret_property in
src/source/config.rs), so what it would redact when printing never lands in the ConfigMap.
*/}}
{{- define "datapulse-bridge.isSecretProperty" -}}
{{- $k := lower . -}}
{{- $sensitive := list "sasl.oauthbearer.assertion.private.key.file" "sasl.oauthbearer.assertion.private.key.passphrase" "sasl.oauthbearer.assertion.private.key.pem" "sasl.oauthbearer.client.secret" "sasl.oauthbearer.config" "sasl.password" "sasl.username" "ssl.ca.pem" "ssl.key.location" "ssl.key.password" "ssl.key.pem" "ssl.keystore.password" "ssl_key" -}}
{{- if has $k $sensitive -}}true{{- else -}}
{{- range list "password" "secret" "jaas" "ssl.key.pem" "ssl_key" "token" "credentials" -}}
{{- if contains . $k -}}true{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* kafka.properties split in two: "secret" (to the chart's Secret) and "plain" (to the ConfigMap). */}}
{{- define "datapulse-bridge.kafkaPropertiesSplit" -}}
{{- $secret := dict -}}
{{- $plain := dict -}}
{{- range $k, $v := .Values.kafka.properties -}}
{{- if include "datapulse-bridge.isSecretProperty" $k -}}
{{- $_ := set $secret $k $v -}}
{{- else -}}
{{- $_ := set $plain $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "secret" $secret "plain" $plain) -}}
{{- end -}}

{{/* The Secret mounted as kafka.properties_file: the user's (kafka.existingSecret), the chart's
(secret properties given in kafka.properties), or none. */}}
{{- define "datapulse-bridge.kafkaPropertiesSecret" -}}
{{- if .Values.kafka.existingSecret -}}
{{- .Values.kafka.existingSecret -}}
{{- else if (include "datapulse-bridge.kafkaPropertiesSplit" . | fromYaml).secret -}}
{{- printf "%s-kafka" (include "datapulse-bridge.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- define "datapulse-bridge.kafkaPropertiesKey" -}}
{{- if .Values.kafka.existingSecret }}{{ .Values.kafka.existingSecretPropertiesKey }}{{ else }}client.properties{{ end -}}
{{- end -}}

{{/* The Secret holding Kafka TLS material: the user's (kafka.tls.existingSecret), the chart's
(inline PEM), or none. */}}
{{- define "datapulse-bridge.kafkaTlsSecret" -}}
{{- $t := .Values.kafka.tls -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if or $t.ca $t.cert $t.key -}}
{{- printf "%s-kafka-tls" (include "datapulse-bridge.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The items of the TLS Secret to mount, as a YAML list of {key, path} (path: the file name). */}}
{{- define "datapulse-bridge.kafkaTlsItems" -}}
{{- $t := .Values.kafka.tls -}}
{{- $items := list -}}
{{- if $t.existingSecret -}}
{{- if $t.caKey }}{{ $items = append $items (dict "key" $t.caKey "path" "ca.crt") }}{{ end -}}
{{- if $t.certKey }}{{ $items = append $items (dict "key" $t.certKey "path" "tls.crt") }}{{ end -}}
{{- if $t.keyKey }}{{ $items = append $items (dict "key" $t.keyKey "path" "tls.key") }}{{ end -}}
{{- else -}}
{{- if $t.ca }}{{ $items = append $items (dict "key" "ca.crt" "path" "ca.crt") }}{{ end -}}
{{- if $t.cert }}{{ $items = append $items (dict "key" "tls.crt" "path" "tls.crt") }}{{ end -}}
{{- if $t.key }}{{ $items = append $items (dict "key" "tls.key" "path" "tls.key") }}{{ end -}}
{{- end -}}
{{- toYaml $items -}}
{{- end -}}

{{/* "true" when the configuration needs Redis. */}}
{{- define "datapulse-bridge.usesRedis" -}}
{{- if or (eq .Values.rateBudget.mode "redis") (eq .Values.dedupe.store "redis") -}}true{{- end -}}
{{- end -}}
