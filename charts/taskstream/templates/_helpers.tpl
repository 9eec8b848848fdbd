{{/* Name of a service's objects: <release>-<service>. */}}
{{- define "taskstream.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels that select one service's pods (stable across upgrades). The component keeps the
migration Job's pods out of the Service, the Deployment and the PDB of the same service.
*/}}
{{- define "taskstream.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component | default "server" }}
{{- end -}}

{{/* Labels on every object of one service. */}}
{{- define "taskstream.labels" -}}
{{ include "taskstream.selectorLabels" . }}
app.kubernetes.io/part-of: taskstream
app.kubernetes.io/version: {{ .root.Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
taskstream.io/environment: {{ .root.Values.environment }}
{{- end -}}

{{/* The image of one service. */}}
{{- define "taskstream.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .name (required "image.tag is required (an immutable release tag)" .root.Values.image.tag) -}}
{{- end -}}

{{/* CloudNativePG cluster of one service. */}}
{{- define "taskstream.dbCluster" -}}
{{- printf "%s%s" .name .root.Values.common.database.clusterSuffix -}}
{{- end -}}

{{/*
Database credentials and URLs. The password comes from CloudNativePG's <cluster>-app Secret by
reference; Kubernetes expands $(VAR) from variables defined earlier in the same list.
Passwords CloudNativePG generates are alphanumeric, so they need no URL escaping.
*/}}
{{- define "taskstream.databaseEnv" -}}
{{- $db := .root.Values.common.database -}}
{{- $cluster := include "taskstream.dbCluster" . -}}
- name: DATABASE_USER
  valueFrom:
    secretKeyRef:
      name: {{ $cluster }}-app
      key: username
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $cluster }}-app
      key: password
- name: DATABASE_WRITER_URL
  value: {{ printf "postgres://$(DATABASE_USER):$(DATABASE_PASSWORD)@%s-rw:%v/%s?sslmode=%s" $cluster $db.port .name $db.sslMode | quote }}
{{- if .reader }}
- name: DATABASE_READER_URL
  value: {{ printf "postgres://$(DATABASE_USER):$(DATABASE_PASSWORD)@%s-ro:%v/%s?sslmode=%s" $cluster $db.port .name $db.sslMode | quote }}
{{- end }}
{{- end -}}

{{/* Pod-level security context shared by services and migration Jobs. */}}
{{- define "taskstream.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: nothing to escalate, nothing to write, no capabilities. */}}
{{- define "taskstream.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Tolerate and prefer burstable nodes (application pods only). */}}
{{- define "taskstream.burstableScheduling" -}}
{{- $s := .root.Values.scheduling -}}
tolerations:
  - key: {{ $s.nodeClassLabel }}
    operator: Equal
    value: {{ $s.burstableValue }}
    effect: NoSchedule
affinity:
  nodeAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: {{ $s.preferBurstableWeight }}
        preference:
          matchExpressions:
            - key: {{ $s.nodeClassLabel }}
              operator: In
              values: [{{ $s.burstableValue | quote }}]
{{- end -}}

{{/*
The public routes: the same table as ROUTES in xtask/src/edge.rs (the local edge), checked
against it by `cargo xtask deploy-check`. Prefixes match whole path segments (/v1/tasks matches
/v1/tasks, /v1/tasks/… but not /v1/tasksfoo). /metrics, /healthz and /readyz are not public.
*/}}
{{- define "taskstream.routes" -}}
- {path: /v1/auth, service: auth}
- {path: /v1/users, service: auth}
- {path: /v1/tasks, service: tasks}
- {path: /v1/notifications, service: notifications}
- {path: /v1/live, service: notifications, websocket: true}
- {path: /v1/analysis, service: analysis}
- {path: /v1/telemetry, service: analysis}
{{- end -}}
