{{- define "cunicu-signal.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cunicu-signal.selector" -}}
app.kubernetes.io/name: cunicu-signal
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cunicu-signal.labels" -}}
{{ include "cunicu-signal.selector" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
