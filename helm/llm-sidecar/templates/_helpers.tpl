{{/*
Named templates. Those marked PUBLIC are an interface for other charts that
add the proxy to their own pods (mode: sidecar, this chart as a dependency):

  {{- $llm := dict "Values" (index .Values "llm-sidecar") "Release" .Release }}
  spec:
    template:
      metadata:
        annotations:
          {{- include "llm-sidecar.podAnnotations" $llm | nindent 10 }}
      spec:
        terminationGracePeriodSeconds: {{ include "llm-sidecar.terminationGracePeriodSeconds" $llm }}
        initContainers:            # "containers:" when sidecar.native is false
          {{- include "llm-sidecar.sidecar" $llm | nindent 10 }}
        volumes:
          {{- include "llm-sidecar.volumes" $llm | nindent 10 }}

They read only .Values (this chart's values) and .Release, and name things
with the fixed chart name "llm-sidecar", so the names they reference are the
ones this chart's own ConfigMap and Secret get in the same release.
*/}}

{{- define "llm-sidecar.name" -}}
{{- default "llm-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "llm-sidecar.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-sidecar.labels" -}}
{{ include "llm-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if hasKey . "Chart" }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llm-sidecar.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}
{{- end }}

{{/* Where the policy ConfigMap is mounted (a directory: no subPath). */}}
{{- define "llm-sidecar.policyDir" -}}/etc/llm-sidecar{{- end }}

{{- define "llm-sidecar.hasApiKey" -}}
{{- if or .Values.upstream.apiKey.existingSecret .Values.upstream.apiKey.value }}true{{ end }}
{{- end }}

{{- define "llm-sidecar.hasRedisPassword" -}}
{{- $p := .Values.cache.redis.password }}
{{- if and (eq .Values.cache.backend "redis") (or $p.existingSecret $p.value) }}true{{ end }}
{{- end }}

{{/* Cross-replica coalescing through a Redis of its own, with a password. */}}
{{- define "llm-sidecar.hasClusterPassword" -}}
{{- $c := .Values.cluster }}
{{- $p := $c.redis.password }}
{{- if and $c.coalesceAcrossReplicas $c.redis.url (or $p.existingSecret $p.value) }}true{{ end }}
{{- end }}

{{/* The data of the Secret this chart creates (empty when it creates none). */}}
{{- define "llm-sidecar.secretData" -}}
{{- $data := dict }}
{{- if and (not .Values.upstream.apiKey.existingSecret) .Values.upstream.apiKey.value }}
{{- $_ := set $data "upstream-api-key" (b64enc .Values.upstream.apiKey.value) }}
{{- end }}
{{- $p := .Values.cache.redis.password }}
{{- if and (eq .Values.cache.backend "redis") (not $p.existingSecret) $p.value }}
{{- $_ := set $data "redis-password" (b64enc $p.value) }}
{{- end }}
{{- $c := .Values.cluster.redis.password }}
{{- if and (include "llm-sidecar.hasClusterPassword" .) (not $c.existingSecret) }}
{{- $_ := set $data "cluster-redis-password" (b64enc $c.value) }}
{{- end }}
{{- if $data }}{{ toYaml $data }}{{ end }}
{{- end }}

{{/*
The policy file. Chart-owned sections (listen, upstreams, cache, reload,
shutdown) come from the values; secrets appear only as env var names.
*/}}
{{- define "llm-sidecar.policy" -}}
{{- $v := .Values }}
{{- $upstream := dict
    "base_url" $v.upstream.baseUrl
    "connect_timeout" $v.upstream.connectTimeout
    "first_byte_timeout" $v.upstream.firstByteTimeout
    "idle_timeout" $v.upstream.idleTimeout
    "max_connections" $v.upstream.maxConnections }}
{{- range $key, $value := dict "max_response_bytes" $v.upstream.maxResponseBytes "max_event_bytes" $v.upstream.maxEventBytes "max_duration" $v.upstream.maxDuration "eject_after" $v.upstream.ejectAfter "eject_for" $v.upstream.ejectFor "max_eject_for" $v.upstream.maxEjectFor }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $upstream $key $value }}
{{- end }}
{{- end }}
{{- if include "llm-sidecar.hasApiKey" . }}
{{- $_ := set $upstream "api_key_env" $v.upstream.apiKey.envVar }}
{{- end }}
{{- $upstreams := dict $v.upstream.name $upstream }}
{{- range $name, $extra := $v.extraUpstreams }}
{{- if hasKey $upstreams $name }}
{{- fail (printf "extraUpstreams.%s: the name is already used by upstream.name" $name) }}
{{- end }}
{{- $_ := set $upstreams $name $extra }}
{{- end }}
{{- $cache := dict "backend" $v.cache.backend "max_bytes" $v.cache.maxBytes "timeout" $v.cache.timeout }}
{{- if eq $v.cache.backend "redis" }}
{{- $_ := set $cache "url" $v.cache.redis.url }}
{{- $_ := set $cache "mode" $v.cache.redis.mode }}
{{- if include "llm-sidecar.hasRedisPassword" . }}
{{- $_ := set $cache "password_env" $v.cache.redis.password.envVar }}
{{- end }}
{{- end }}
{{- $routes := list }}
{{- range $v.policy.routes }}
{{- /* A route that lists its targets names its upstreams itself. */}}
{{- if hasKey . "targets" }}
{{- $routes = append $routes . }}
{{- else }}
{{- $routes = append $routes (merge (dict) . (dict "upstream" $v.upstream.name)) }}
{{- end }}
{{- end }}
{{- $policy := dict
    "listen" (dict "host" "0.0.0.0" "port" $v.port)
    "log" (dict "level" $v.policy.logLevel)
    "upstreams" $upstreams
    "cache" $cache
    "reload" (dict "watch" $v.reload.watch "interval" $v.reload.interval)
    "shutdown" (dict
      "accept_delay" (printf "%ds" (int $v.shutdown.acceptDelaySeconds))
      "drain_timeout" (printf "%ds" (int $v.shutdown.drainTimeoutSeconds)))
    "routes" $routes }}
{{- /* Only when enabled: a release without the feature renders the policy it always did. */}}
{{- $c := $v.cluster }}
{{- if $c.coalesceAcrossReplicas }}
{{- $cluster := dict
    "coalesce_across_replicas" true
    "lease" $c.lease
    "stream_ttl" $c.streamTtl
    "max_stream_bytes" $c.maxStreamBytes
    "timeout" $c.timeout }}
{{- with $c.redis.url }}
{{- $_ := set $cluster "url" . }}
{{- $_ := set $cluster "mode" $c.redis.mode }}
{{- end }}
{{- if include "llm-sidecar.hasClusterPassword" . }}
{{- $_ := set $cluster "password_env" $c.redis.password.envVar }}
{{- end }}
{{- $_ := set $policy "cluster" $cluster }}
{{- end }}
{{- if $v.admin.enabled }}
{{- $_ := set $policy "admin" (dict "host" "0.0.0.0" "port" $v.admin.port) }}
{{- end }}
{{- range $key := list "limits" "stages" "stream" }}
{{- with index $v.policy $key }}
{{- $_ := set $policy $key . }}
{{- end }}
{{- end }}
# Rendered by the llm-sidecar chart: change the values and `helm upgrade`; the proxy reloads it.
{{ toYaml $policy }}
{{- end }}

{{/* PUBLIC: seconds the pod needs to stop: preStop + acceptDelay + drain + margin. */}}
{{- define "llm-sidecar.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- $needed := add $s.preStopSleepSeconds $s.acceptDelaySeconds $s.drainTimeoutSeconds }}
{{- /* index, not a field: a null value may have been dropped from the map */}}
{{- $grace := index $s "terminationGracePeriodSeconds" }}
{{- if kindIs "invalid" $grace }}
{{- add $needed 10 }}
{{- else if le (int $grace) (int $needed) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + acceptDelaySeconds + drainTimeoutSeconds (%d), or in-flight requests are killed mid-drain" (int $grace) (int $needed)) }}
{{- else }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/* PUBLIC: pod template annotations (mapping lines; may be empty). */}}
{{- define "llm-sidecar.podAnnotations" -}}
{{- $annotations := dict }}
{{- if .Values.reload.rollOnChange }}
{{- $_ := set $annotations "checksum/llm-sidecar-policy" (include "llm-sidecar.policy" . | sha256sum) }}
{{- end }}
{{- /* Environment variables never reload: a new key must restart the pod. */}}
{{- with include "llm-sidecar.secretData" . }}
{{- $_ := set $annotations "checksum/llm-sidecar-secret" (sha256sum .) }}
{{- end }}
{{- if $annotations }}{{ toYaml $annotations }}{{ end }}
{{- end }}

{{/* The proxy container, as mapping lines (name first). */}}
{{- define "llm-sidecar.containerSpec" -}}
{{- $v := .Values -}}
name: {{ $v.sidecar.containerName }}
image: {{ include "llm-sidecar.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
command: ["llm-sidecar", "serve"]
args:
  - --policy
  - {{ include "llm-sidecar.policyDir" . }}/policy.yaml
  - --host
  - 0.0.0.0
  - --port
  - {{ $v.port | quote }}
ports:
  - name: llm-http
    containerPort: {{ $v.port }}
    protocol: TCP
  {{- if $v.admin.enabled }}
  - name: llm-admin
    containerPort: {{ $v.admin.port }}
    protocol: TCP
  {{- end }}
{{- $probePort := ternary "llm-admin" "llm-http" (and $v.admin.enabled true) }}
{{- $key := $v.upstream.apiKey }}
{{- $redis := $v.cache.redis.password }}
{{- $cluster := $v.cluster.redis.password }}
{{- if or (include "llm-sidecar.hasApiKey" .) (include "llm-sidecar.hasRedisPassword" .) (include "llm-sidecar.hasClusterPassword" .) $v.extraEnv }}
env:
  {{- if include "llm-sidecar.hasApiKey" . }}
  - name: {{ $key.envVar }}
    valueFrom:
      secretKeyRef:
        {{- if $key.existingSecret }}
        name: {{ $key.existingSecret }}
        key: {{ $key.existingSecretKey }}
        {{- else }}
        name: {{ include "llm-sidecar.fullname" . }}
        key: upstream-api-key
        {{- end }}
  {{- end }}
  {{- if include "llm-sidecar.hasRedisPassword" . }}
  - name: {{ $redis.envVar }}
    valueFrom:
      secretKeyRef:
        {{- if $redis.existingSecret }}
        name: {{ $redis.existingSecret }}
        key: {{ $redis.existingSecretKey }}
        {{- else }}
        name: {{ include "llm-sidecar.fullname" . }}
        key: redis-password
        {{- end }}
  {{- end }}
  {{- if include "llm-sidecar.hasClusterPassword" . }}
  - name: {{ $cluster.envVar }}
    valueFrom:
      secretKeyRef:
        {{- if $cluster.existingSecret }}
        name: {{ $cluster.existingSecret }}
        key: {{ $cluster.existingSecretKey }}
        {{- else }}
        name: {{ include "llm-sidecar.fullname" . }}
        key: cluster-redis-password
        {{- end }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
startupProbe:
  httpGet: {path: /readyz, port: {{ $probePort }}}
  {{- toYaml $v.probes.startup | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: {{ $probePort }}}
  {{- toYaml $v.probes.readiness | nindent 2 }}
livenessProbe:
  httpGet: {path: /healthz, port: {{ $probePort }}}
  {{- toYaml $v.probes.liveness | nindent 2 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ $v.shutdown.preStopSleepSeconds | quote }}]
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
  - name: llm-sidecar-policy
    mountPath: {{ include "llm-sidecar.policyDir" . }}
    readOnly: true
  - name: llm-sidecar-tmp
    mountPath: /tmp
{{- end }}

{{/*
PUBLIC: the proxy as one list item, for `initContainers:` (native sidecar,
the default) or `containers:` (sidecar.native: false; also standalone).
*/}}
{{- define "llm-sidecar.sidecar" -}}
- {{ include "llm-sidecar.containerSpec" . | indent 2 | trim }}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
{{- end }}
{{- end }}

{{/* PUBLIC: the volumes the proxy container mounts, as list items. */}}
{{- define "llm-sidecar.volumes" -}}
- name: llm-sidecar-policy
  configMap:
    name: {{ include "llm-sidecar.fullname" . }}
- name: llm-sidecar-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- end }}

{{/* Pod spec fields shared by the pods this chart creates. */}}
{{- define "llm-sidecar.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ include "llm-sidecar.terminationGracePeriodSeconds" . }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "llm-sidecar.volumes" . | nindent 2 }}
{{- end }}

{{/* Cross-field checks the schema cannot express; included once, by the ConfigMap. */}}
{{- define "llm-sidecar.validate" -}}
{{- $v := .Values }}
{{- if and $v.upstream.apiKey.existingSecret $v.upstream.apiKey.value }}
{{- fail "upstream.apiKey: set existingSecret or value, not both" }}
{{- end }}
{{- include "llm-sidecar.validateRedis" (dict "at" "cache.redis" "redis" $v.cache.redis) }}
{{- include "llm-sidecar.validateRedis" (dict "at" "cluster.redis" "redis" $v.cluster.redis) }}
{{- if eq $v.cache.backend "redis" }}
{{- if not $v.cache.redis.url }}
{{- fail "cache.redis.url is required when cache.backend is redis (the chart does not install Redis)" }}
{{- end }}
{{- if and $v.cache.redis.password.existingSecret $v.cache.redis.password.value }}
{{- fail "cache.redis.password: set existingSecret or value, not both" }}
{{- end }}
{{- end }}
{{- $c := $v.cluster }}
{{- if and $c.coalesceAcrossReplicas (not $c.redis.url) (ne $v.cache.backend "redis") }}
{{- fail "cluster.coalesceAcrossReplicas needs a Redis shared by the replicas: set cache.backend=redis (with cache.redis.url) to share the cache's, or cluster.redis.url" }}
{{- end }}
{{- if and (not $c.redis.url) (or $c.redis.password.existingSecret $c.redis.password.value) }}
{{- fail "cluster.redis.password applies to cluster.redis.url; without that URL the cache's Redis and cache.redis.password are used" }}
{{- end }}
{{- if and $c.redis.password.existingSecret $c.redis.password.value }}
{{- fail "cluster.redis.password: set existingSecret or value, not both" }}
{{- end }}
{{- if and $v.admin.enabled (eq (int $v.admin.port) (int $v.port)) }}
{{- fail "admin.port must differ from port (the admin listener is a second socket)" }}
{{- end }}
{{- $last := last $v.policy.routes }}
{{- if or (ne $last.match.path "/v1/*") (hasKey $last.match "methods") }}
{{- fail "policy.routes: the last route must be the catch-all match: {path: \"/v1/*\"} with no methods" }}
{{- end }}
{{- if and $v.standalone.autoscaling.enabled (not (dig "requests" "cpu" "" $v.resources)) }}
{{- fail "standalone.autoscaling needs resources.requests.cpu (CPU utilisation is a percentage of it)" }}
{{- end }}
{{- if eq $v.mode "sidecar" }}
{{- range $feature := list "autoscaling" "podDisruptionBudget" "serviceMonitor" }}
{{- if (index $v.standalone $feature).enabled }}
{{- fail (printf "standalone.%s.enabled applies to mode: standalone only; in sidecar mode your own workload owns scaling, disruption budgets and scraping" $feature) }}
{{- end }}
{{- end }}
{{- if and $v.sidecar.native (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "sidecar.native needs Kubernetes >= 1.29 (native sidecar containers); the target is %s. Set sidecar.native=false, or give helm template --kube-version" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The URL rules for a Redis location ("at": cache.redis or cluster.redis). */}}
{{- define "llm-sidecar.validateRedis" -}}
{{- $at := .at }}
{{- with .redis.url }}
{{- if not (regexMatch "^(rediss?|unix)://" .) }}
{{- fail (printf "%s.url: expected redis://host:6379/0 (rediss:// for TLS, unix:///path/to/socket)" $at) }}
{{- end }}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" . }}
{{- fail (printf "%s.url: no password in the URL (it would land in the ConfigMap). Write redis://host:6379/0 (or redis://USER@host:6379/0 for an ACL user) and put the password in %s.password.existingSecret (a Secret you manage) or %s.password.value (the chart creates the Secret)" $at $at $at) }}
{{- end }}
{{- if and (eq $.redis.mode "cluster") (not (regexMatch "^rediss?://[^/]*(/0?)?$" .)) }}
{{- fail (printf "%s.url: a Redis Cluster is reached over TCP and has only database 0: redis://host:6379 or rediss://host:6380/0" $at) }}
{{- end }}
{{- end }}
{{- end }}
