{{- define "obs.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "obs.labels" -}}
{{ include "obs.selectorLabels" . }}
app.kubernetes.io/part-of: observability
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
taskstream.io/environment: {{ required "environment is required" .root.Values.environment }}
{{- end -}}

{{/* Required: standard nodes only. Observability never lands on a burstable node. */}}
{{- define "obs.affinity" -}}
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - key: {{ .root.Values.nodeClass.label }}
              operator: In
              values: [{{ .root.Values.nodeClass.standard | quote }}]
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "obs.selectorLabels" . | nindent 14 }}
{{- end -}}

{{/* Pod security context for a non-root image; .uid is the image's own user. */}}
{{- define "obs.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid }}
  runAsGroup: {{ .uid }}
  fsGroup: {{ .uid }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "obs.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  privileged: false
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/* A PodDisruptionBudget for one component. */}}
{{- define "obs.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "obs.labels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "obs.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* A ClusterIP Service; .ports is a list of {name, port}. */}}
{{- define "obs.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "obs.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "obs.selectorLabels" . | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
    {{- end }}
{{- end -}}
