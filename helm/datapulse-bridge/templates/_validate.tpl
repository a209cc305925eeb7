{{/*
Refuses the combinations that would lose data, send a transaction twice, or spend more than the
API key's rate limit. Included by the workload, so `helm install/upgrade/template` stop on them.
*/}}
{{- define "datapulse-bridge.validate" -}}
{{- $v := .Values -}}
{{- $partitions := int $v.kafka.partitions -}}
{{- $replicas := int $v.replicaCount -}}
{{- $auto := $v.autoscaling.enabled -}}
{{- if gt $replicas $partitions -}}
{{- fail (printf "replicaCount (%d) exceeds kafka.partitions (%d): a replica beyond the partition count gets no partition. Lower replicaCount or raise kafka.partitions to the topics' real partition count." $replicas $partitions) -}}
{{- end -}}
{{- if $auto -}}
{{- if gt (int $v.autoscaling.maxReplicas) $partitions -}}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds kafka.partitions (%d): set autoscaling.maxReplicas <= kafka.partitions." (int $v.autoscaling.maxReplicas) $partitions) -}}
{{- end -}}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%d) exceeds autoscaling.maxReplicas (%d)." (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- $many := or (gt $replicas 1) (and $auto (gt (int $v.autoscaling.maxReplicas) 1)) -}}
{{- if and $many (eq $v.rateBudget.mode "local") -}}
{{- fail "rateBudget.mode=local lets every replica spend the whole key's limit: with more than one replica (or autoscaling above 1) set rateBudget.mode=redis (shared budget) or static_share (limit ÷ replicas, fixed replica count)." -}}
{{- end -}}
{{- if and $auto (eq $v.rateBudget.mode "static_share") -}}
{{- fail "rateBudget.mode=static_share divides the limit by a fixed replicaCount, which autoscaling would change: set rateBudget.mode=redis to autoscale, or disable autoscaling." -}}
{{- end -}}
{{- if and (eq $v.rateBudget.mode "static_share") (lt (int $v.rateBudget.limit) (mul $replicas (int $v.rateBudget.burst))) -}}
{{- fail (printf "rateBudget.limit (%d) divided among %d replicas leaves less than one request per window each: lower replicaCount or use rateBudget.mode=redis." (int $v.rateBudget.limit) $replicas) -}}
{{- end -}}
{{- if and $many (eq $v.dedupe.store "memory") -}}
{{- fail "dedupe.store=memory keeps each replica's own seen-set, so a transaction seen by another replica (or before a rebalance) could be sent twice: with more than one replica set dedupe.store=redis." -}}
{{- end -}}
{{- if and (include "datapulse-bridge.usesRedis" .) (not $v.redis.url) -}}
{{- fail "rateBudget.mode=redis or dedupe.store=redis needs Redis: set redis.url (redis://host:6379/0; a password goes in redis.existingSecret)." -}}
{{- end -}}
{{- if and $v.redis.url (contains "@" $v.redis.url) -}}
{{- fail "redis.url must not hold credentials (it lands in a ConfigMap): put the password in a Secret named by redis.existingSecret." -}}
{{- end -}}
{{- if and (not $v.kafka.topics) (not $v.kafka.topicPattern) -}}
{{- fail "set kafka.topics (a list) or kafka.topicPattern (a regular expression)." -}}
{{- end -}}
{{- if and $v.kafka.topics $v.kafka.topicPattern -}}
{{- fail "set either kafka.topics or kafka.topicPattern, not both." -}}
{{- end -}}
{{- range $k, $_ := $v.kafka.properties -}}
{{- if has $k (list "group.id" "bootstrap.servers" "enable.auto.commit" "enable.auto.offset.store" "group.instance.id") -}}
{{- fail (printf "kafka.properties.%s is managed by the bridge (commits happen only after delivery): remove it." $k) -}}
{{- end -}}
{{- end -}}
{{- $secretProps := (include "datapulse-bridge.kafkaPropertiesSplit" . | fromYaml).secret -}}
{{- if and $v.kafka.existingSecret $secretProps -}}
{{- fail (printf "kafka.properties holds secret properties (%s) while kafka.existingSecret is set: the bridge reads one properties file, so put them in that Secret's %s and remove them from kafka.properties." (keys $secretProps | sortAlpha | join ", ") $v.kafka.existingSecretPropertiesKey) -}}
{{- end -}}
{{- range $k, $val := $secretProps -}}
{{- if and (kindIs "string" $val) (or (contains "\n" $val) (contains "\r" $val)) -}}
{{- fail (printf "kafka.properties.%s spans several lines, which the properties file cannot hold: give PEM material as files with kafka.tls (ca, cert, key, or an existing Secret)." $k) -}}
{{- end -}}
{{- end -}}
{{- $t := $v.kafka.tls -}}
{{- if and $t.existingSecret (or $t.ca $t.cert $t.key) -}}
{{- fail "kafka.tls: set either existingSecret (with caKey, certKey, keyKey) or the inline ca, cert and key, not both." -}}
{{- end -}}
{{- if $t.existingSecret -}}
{{- if ne (empty $t.certKey) (empty $t.keyKey) -}}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together (a client certificate needs its key): set both or neither." -}}
{{- end -}}
{{- if not (or $t.caKey $t.certKey) -}}
{{- fail "kafka.tls.existingSecret is set but names no item: set kafka.tls.caKey and/or kafka.tls.certKey with kafka.tls.keyKey." -}}
{{- end -}}
{{- else if ne (empty $t.cert) (empty $t.key) -}}
{{- fail "kafka.tls.cert and kafka.tls.key go together (a client certificate needs its key): set both or neither." -}}
{{- end -}}
{{- if include "datapulse-bridge.kafkaTlsSecret" . -}}
{{- range $k, $_ := $v.kafka.properties -}}
{{- if has $k (list "ssl.ca.location" "ssl.certificate.location" "ssl.key.location" "ssl.ca.pem" "ssl.certificate.pem" "ssl.key.pem") -}}
{{- fail (printf "kafka.properties.%s conflicts with kafka.tls, which sets the CA, certificate and key locations: remove one of the two." $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
