{{/* Names and labels. */}}
{{- define "eigenwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eigenwatch.fullname" -}}
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

{{- define "eigenwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eigenwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eigenwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eigenwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eigenwatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels of the pods the sidecar runs in: ours (deploy) or the user's vLLM pods (attach). */}}
{{- define "eigenwatch.podSelector" -}}
{{- if eq .Values.mode "attach" -}}
{{ toYaml .Values.attach.podSelector }}
{{- else -}}
{{ include "eigenwatch.selectorLabels" . }}
{{- end -}}
{{- end -}}

{{- define "eigenwatch.tokenSecretName" -}}
{{- if .Values.auth.token.secretName -}}
{{- .Values.auth.token.secretName -}}
{{- else -}}
{{- printf "%s-token" (include "eigenwatch.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "eigenwatch.calibrationConfigMap" -}}
{{- default (printf "%s-calibration" (include "eigenwatch.fullname" .)) .Values.calibration.existingConfigMap -}}
{{- end -}}

{{- define "eigenwatch.hasCalibration" -}}
{{- $n := 0 -}}
{{- if .Values.calibration.existingConfigMap }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.calibration.data }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.calibration.volume }}{{ $n = add1 $n }}{{ end -}}
{{- if gt $n 1 -}}
{{- fail "calibration: set at most one of calibration.existingConfigMap, calibration.data and calibration.volume" -}}
{{- end -}}
{{- if gt $n 0 }}true{{ end -}}
{{- end -}}

{{/* The gRPC address: the sidecar listens on it, the tap dials it. */}}
{{- define "eigenwatch.listen" -}}
{{- if eq .Values.sidecar.transport "unix" -}}
unix://{{ .Values.sidecar.socketDir }}/sidecar.sock
{{- else -}}
0.0.0.0:{{ .Values.sidecar.grpcPort }}
{{- end -}}
{{- end -}}

{{- define "eigenwatch.tapTarget" -}}
{{- if eq .Values.sidecar.transport "unix" -}}
unix://{{ .Values.sidecar.socketDir }}/sidecar.sock
{{- else -}}
127.0.0.1:{{ .Values.sidecar.grpcPort }}
{{- end -}}
{{- end -}}

{{/* The health check: the same command as the image's HEALTHCHECK (Dockerfile; a test keeps them equal). */}}
{{- define "eigenwatch.healthCommand" -}}
- python
- -c
- "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; target = os.environ.get('EIGENWATCH_HEALTH_TARGET', '127.0.0.1:50151'); reply = g.HealthStub(grpc.insecure_channel(target)).Check(h.HealthCheckRequest(), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"
{{- end -}}

{{/* A probe's handler; call with (dict "root" $ "service" NAME). */}}
{{- define "eigenwatch.probeHandler" -}}
{{- $v := .root.Values -}}
{{- if eq $v.sidecar.transport "unix" }}
exec:
  command:
    {{- include "eigenwatch.healthCommand" .root | nindent 4 }}
{{- else if $v.tls.enabled }}
tcpSocket:
  port: ew-grpc
{{- else }}
grpc:
  port: {{ $v.sidecar.grpcPort }}
  service: {{ .service | quote }}
{{- end }}
{{- end -}}

{{/* The sidecar container. */}}
{{- define "eigenwatch.sidecarContainer" -}}
{{- $cal := include "eigenwatch.hasCalibration" . -}}
- name: eigenwatch
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - --listen
    - {{ include "eigenwatch.listen" . | quote }}
    - --metrics-host
    - "0.0.0.0"
    - --metrics-port
    - {{ .Values.sidecar.metricsPort | quote }}
    - --calibration-frames
    - {{ .Values.sidecar.calibrationFrames | quote }}
    - --persist
    - {{ .Values.sidecar.persist | quote }}
    - --nice
    - {{ .Values.sidecar.nice | quote }}
    {{- if $cal }}
    - --calibration
    - /etc/eigenwatch/calibration/{{ .Values.calibration.fileName }}
    {{- end }}
    {{- if .Values.auth.token.enabled }}
    - --token-file
    - /etc/eigenwatch/token/{{ .Values.auth.token.secretKey }}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - --tls-cert
    - /etc/eigenwatch/tls/tls.crt
    - --tls-key
    - /etc/eigenwatch/tls/tls.key
    {{- if .Values.tls.clientCA.secretName }}
    - --tls-client-ca
    - /etc/eigenwatch/client-ca/{{ .Values.tls.clientCA.key }}
    {{- end }}
    {{- end }}
    {{- if .Values.auth.allowInsecureListen }}
    - --allow-insecure-listen
    {{- end }}
    {{- range .Values.sidecar.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: EIGENWATCH_HEALTH_TARGET
      value: {{ include "eigenwatch.tapTarget" . | quote }}
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- if ne .Values.sidecar.transport "unix" }}
    - name: ew-grpc
      containerPort: {{ .Values.sidecar.grpcPort }}
      protocol: TCP
    {{- end }}
    - name: ew-metrics
      containerPort: {{ .Values.sidecar.metricsPort }}
      protocol: TCP
  livenessProbe:
    {{- include "eigenwatch.probeHandler" (dict "root" . "service" "") | nindent 4 }}
    {{- toYaml .Values.sidecar.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- include "eigenwatch.probeHandler" (dict "root" . "service" "eigenwatch.v1.Monitor") | nindent 4 }}
    {{- toYaml .Values.sidecar.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: eigenwatch-tmp
      mountPath: /tmp
    {{- if eq .Values.sidecar.transport "unix" }}
    - name: eigenwatch-socket
      mountPath: {{ .Values.sidecar.socketDir }}
    {{- end }}
    {{- if $cal }}
    - name: eigenwatch-calibration
      mountPath: /etc/eigenwatch/calibration
      readOnly: true
    {{- end }}
    {{- if .Values.auth.token.enabled }}
    - name: eigenwatch-token
      mountPath: /etc/eigenwatch/token
      readOnly: true
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: eigenwatch-tls
      mountPath: /etc/eigenwatch/tls
      readOnly: true
    {{- if .Values.tls.clientCA.secretName }}
    - name: eigenwatch-client-ca
      mountPath: /etc/eigenwatch/client-ca
      readOnly: true
    {{- end }}
    {{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* What the vLLM container needs to reach the sidecar: env and mounts. */}}
{{- define "eigenwatch.tapEnv" -}}
- name: EIGENWATCH_ENABLE
  value: "1"
- name: EIGENWATCH_SIDECAR
  value: {{ include "eigenwatch.tapTarget" . | quote }}
{{- $model := ternary .Values.attach.modelName .Values.vllm.servedModelName (eq .Values.mode "attach") }}
{{- if $model }}
- name: EIGENWATCH_MODEL_NAME
  value: {{ $model | quote }}
{{- end }}
{{- if .Values.vllm.tap.layers }}
- name: EIGENWATCH_LAYERS
  value: {{ .Values.vllm.tap.layers | quote }}
{{- end }}
- name: EIGENWATCH_WINDOW
  value: {{ .Values.vllm.tap.window | quote }}
- name: EIGENWATCH_STRIDE
  value: {{ .Values.vllm.tap.stride | quote }}
- name: EIGENWATCH_DEFAULT
  value: {{ .Values.vllm.tap.default | quote }}
{{- if and .Values.vllm.tap.combined (include "eigenwatch.hasCalibration" .) }}
- name: EIGENWATCH_CALIBRATION
  value: /etc/eigenwatch/calibration/{{ .Values.calibration.fileName }}
{{- end }}
{{- if .Values.auth.token.enabled }}
- name: EIGENWATCH_TOKEN_FILE
  value: /etc/eigenwatch/token/{{ .Values.auth.token.secretKey }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: EIGENWATCH_TLS_CA
  value: /etc/eigenwatch/tls-ca/{{ .Values.tls.caKey }}
- name: EIGENWATCH_TLS_SERVER_NAME
  value: {{ .Values.tls.serverName | quote }}
{{- if .Values.tls.clientCA.secretName }}
- name: EIGENWATCH_TLS_CERT
  value: /etc/eigenwatch/tap-tls/tls.crt
- name: EIGENWATCH_TLS_KEY
  value: /etc/eigenwatch/tap-tls/tls.key
{{- end }}
{{- end }}
{{- with .Values.vllm.tap.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "eigenwatch.tapVolumeMounts" -}}
{{- if eq .Values.sidecar.transport "unix" }}
- name: eigenwatch-socket
  mountPath: {{ .Values.sidecar.socketDir }}
{{- end }}
{{- if and .Values.vllm.tap.combined (include "eigenwatch.hasCalibration" .) }}
- name: eigenwatch-calibration
  mountPath: /etc/eigenwatch/calibration
  readOnly: true
{{- end }}
{{- if .Values.auth.token.enabled }}
- name: eigenwatch-token
  mountPath: /etc/eigenwatch/token
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: eigenwatch-tls-ca
  mountPath: /etc/eigenwatch/tls-ca
  readOnly: true
{{- if .Values.tls.clientCA.secretName }}
- name: eigenwatch-tap-tls
  mountPath: /etc/eigenwatch/tap-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The pod volumes both containers use. */}}
{{- define "eigenwatch.volumes" -}}
- name: eigenwatch-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if eq .Values.sidecar.transport "unix" }}
- name: eigenwatch-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if include "eigenwatch.hasCalibration" . }}
- name: eigenwatch-calibration
{{- if .Values.calibration.volume }}
  {{- toYaml .Values.calibration.volume | nindent 2 }}
{{- else }}
  configMap:
    name: {{ include "eigenwatch.calibrationConfigMap" . }}
    items:
      - key: {{ .Values.calibration.fileName }}
        path: {{ .Values.calibration.fileName }}
{{- end }}
{{- end }}
{{- if .Values.auth.token.enabled }}
- name: eigenwatch-token
  secret:
    secretName: {{ include "eigenwatch.tokenSecretName" . }}
    items:
      - key: {{ .Values.auth.token.secretKey }}
        path: {{ .Values.auth.token.secretKey }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: eigenwatch-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
- name: eigenwatch-tls-ca
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - key: {{ .Values.tls.caKey }}
        path: {{ .Values.tls.caKey }}
{{- if .Values.tls.clientCA.secretName }}
- name: eigenwatch-client-ca
  secret:
    secretName: {{ .Values.tls.clientCA.secretName }}
    items:
      - key: {{ .Values.tls.clientCA.key }}
        path: {{ .Values.tls.clientCA.key }}
- name: eigenwatch-tap-tls
  secret:
    secretName: {{ .Values.tls.tapClientSecretName }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end -}}
