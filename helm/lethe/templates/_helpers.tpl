{{/* Names ------------------------------------------------------------------------------------------ */}}
{{- define "lethe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lethe.fullname" -}}
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

{{- define "lethe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lethe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lethe
{{- end -}}

{{- define "lethe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lethe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lethe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lethe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lethe.jobServiceAccountName" -}}
{{- printf "%s-job" (include "lethe.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lethe.secretName" -}}
{{- default (printf "%s-env" (include "lethe.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "lethe.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "lethe.stateDir" -}}/var/lib/lethe{{- end -}}

{{/* Modes ------------------------------------------------------------------------------------------ */}}
{{/* Scale-out: the job store and MLflow are servers that every pod shares. */}}
{{- define "lethe.scaleOut" -}}
{{- if or .Values.secrets.jobStoreUrl .Values.secrets.existingSecret -}}
{{- if regexMatch "^https?://" (toString .Values.config.LETHE_MLFLOW_TRACKING_URI) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The state directory lives on a PersistentVolumeClaim (embedded mode). */}}
{{- define "lethe.persistent" -}}
{{- if .Values.persistence.enabled -}}true{{- end -}}
{{- end -}}

{{/* Cross-field checks the schema cannot express, each failing with what to change. */}}
{{- define "lethe.validate" -}}
{{- $scaleOut := include "lethe.scaleOut" . -}}
{{- $why := "set secrets.jobStoreUrl (postgresql+psycopg://...) or secrets.existingSecret, and config.LETHE_MLFLOW_TRACKING_URI (http(s)://...)" -}}
{{- if and (gt (int .Values.api.replicas) 1) (not $scaleOut) -}}
{{- fail (printf "api.replicas > 1 needs the scale-out job store and MLflow server: %s" $why) -}}
{{- end -}}
{{- if and (gt (int .Values.api.replicas) 1) .Values.persistence.enabled -}}
{{- fail "api.replicas > 1 cannot share the ReadWriteOnce state volume: set persistence.enabled=false (scale-out keeps no state in the pods)" -}}
{{- end -}}
{{- if and (eq .Values.executor.type "kubernetes") (not $scaleOut) -}}
{{- fail (printf "executor.type=kubernetes runs jobs in other pods, which need the scale-out job store and MLflow server: %s" $why) -}}
{{- end -}}
{{- if and .Values.worker.enabled (not $scaleOut) -}}
{{- fail (printf "worker.enabled runs jobs in other pods, which need the scale-out job store and MLflow server: %s" $why) -}}
{{- end -}}
{{- if and .Values.worker.enabled (eq .Values.executor.type "kubernetes") -}}
{{- fail "choose one way to run jobs: worker.enabled (a worker Deployment) or executor.type=kubernetes (one Job per job), not both" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key (e.g. from a cert-manager Certificate)" -}}
{{- end -}}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) -}}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" -}}
{{- end -}}
{{- if and .Values.auth.tokensFile.enabled (not (or .Values.auth.tokensFile.existingSecret .Values.auth.tokensFile.content)) -}}
{{- fail "auth.tokensFile.enabled needs auth.tokensFile.existingSecret or auth.tokensFile.content" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- end -}}

{{/* A setting's value as the string an environment variable carries. Numbers go through JSON so that a
large integer never becomes 1e+06 (Helm reads YAML numbers as float64). */}}
{{- define "lethe.envValue" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* Environment shared by every Lethe container (API and worker): the ConfigMap and Secret whole, and the
few variables that are per pod. */}}
{{- define "lethe.envFrom" -}}
- configMapRef:
    name: {{ include "lethe.fullname" . }}
- secretRef:
    name: {{ include "lethe.secretName" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "lethe.env" -}}
- name: LETHE_WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The API container's own settings: the files it serves RPCs with (workers serve none, and get none). */}}
{{- define "lethe.apiEnv" -}}
{{- if .Values.tls.enabled }}
- name: LETHE_TLS_CERT
  value: /etc/lethe/tls/tls.crt
- name: LETHE_TLS_KEY
  value: /etc/lethe/tls/tls.key
{{- if .Values.tls.clientCA.enabled }}
- name: LETHE_TLS_CLIENT_CA
  value: /etc/lethe/client-ca/ca.crt
{{- end }}
{{- end }}
{{- if .Values.auth.tokensFile.enabled }}
- name: LETHE_AUTH_TOKENS_FILE
  value: /etc/lethe/auth/tokens
{{- end }}
{{- end -}}

{{/* Volumes: scratch /tmp, the state directory, and for the API the TLS / token files as whole directories
(a subPath mount would never see a rotated certificate). */}}
{{- define "lethe.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.tmpSizeLimit }}
- name: state
{{- if and .persistent .root.Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-state" (include "lethe.fullname" .root)) .root.Values.persistence.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.stateSizeLimit }}
{{- end }}
{{- if and .api .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .root.Values.tls.secretName }}
{{- if .root.Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ default .root.Values.tls.secretName .root.Values.tls.clientCA.secretName }}
    items:
      - key: {{ .root.Values.tls.clientCA.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- if and .api .root.Values.auth.tokensFile.enabled }}
- name: auth-tokens
  secret:
    secretName: {{ default (printf "%s-tokens" (include "lethe.fullname" .root)) .root.Values.auth.tokensFile.existingSecret }}
    items:
      - key: {{ .root.Values.auth.tokensFile.key }}
        path: tokens
{{- end }}
{{- end -}}

{{- define "lethe.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: {{ include "lethe.stateDir" .root }}
{{- if and .api .root.Values.tls.enabled }}
- name: tls
  mountPath: /etc/lethe/tls
  readOnly: true
{{- if .root.Values.tls.clientCA.enabled }}
- name: client-ca
  mountPath: /etc/lethe/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- if and .api .root.Values.auth.tokensFile.enabled }}
- name: auth-tokens
  mountPath: /etc/lethe/auth
  readOnly: true
{{- end }}
{{- end -}}

{{/* The exec health probe used when TLS is on (the kubelet's gRPC probe speaks plaintext only). Arguments:
port, health service name, CA file, server name. It presents the server's own certificate as client
certificate, so it also passes under mutual TLS. */}}
{{- define "lethe.tlsProbe" -}}
exec:
  command:
    - python
    - -c
    - |-
      import os, sys, grpc
      from grpc_health.v1 import health_pb2, health_pb2_grpc
      port, service, ca, name = sys.argv[1:5]
      read = lambda path: open(path, "rb").read()
      credentials = grpc.ssl_channel_credentials(read(ca), read(os.environ["LETHE_TLS_KEY"]), read(os.environ["LETHE_TLS_CERT"]))
      channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", name)])
      reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=4)
      sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
    - {{ .root.Values.service.grpcPort | quote }}
    - {{ .service | quote }}
    - /etc/lethe/tls/{{ .root.Values.tls.probeCAKey }}
    - {{ default (printf "%s.%s.svc" (include "lethe.fullname" .root) .root.Release.Namespace) .root.Values.tls.probeServerName | quote }}
{{- end -}}

{{- define "lethe.probe" -}}
{{- if .root.Values.tls.enabled -}}
{{ include "lethe.tlsProbe" . }}
{{- else -}}
grpc:
  port: {{ .root.Values.service.grpcPort }}
  service: {{ .service | quote }}
{{- end }}
{{- end -}}

{{/* Alert rules: labels and runbook annotations (prometheusrule.yaml). */}}
{{- define "lethe.alertLabels" -}}
severity: {{ .severity }}
{{- with .root.Values.alerts.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
{{- define "lethe.runbook" -}}
runbook: {{ printf "docs/operations.md#%s" (lower .alert) | quote }}
{{- with .root.Values.alerts.runbookBaseUrl }}
runbook_url: {{ printf "%s#%s" (trimSuffix "#" .) (lower $.alert) | quote }}
{{- end }}
{{- end -}}
