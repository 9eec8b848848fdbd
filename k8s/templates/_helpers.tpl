{{- define "platform.labels" -}}
app.kubernetes.io/part-of: taskstream-platform
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
taskstream.io/environment: {{ required "environment is required" .Values.environment }}
{{- end -}}

{{/* Required node affinity: standard (non-burstable) nodes only. */}}
{{- define "platform.standardNodeAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: {{ .Values.nodeClass.label }}
            operator: In
            values: [{{ .Values.nodeClass.standard | quote }}]
{{- end -}}
