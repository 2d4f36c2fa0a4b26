{{- define "credbroker.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "credbroker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "credbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "credbroker.labels" -}}
{{ include "credbroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "credbroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "credbroker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "credbroker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "credbroker.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "credbroker.fullname" .) -}}
{{- else -}}
{{- required "tls.existingSecret (or tls.certManager.enabled)" .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Locked-down security context shared by the broker and the migration job. */}}
{{- define "credbroker.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment carrying every secret, from Secrets only. */}}
{{- define "credbroker.secretEnv" -}}
- name: CREDBROKER__POSTGRES__URL
  valueFrom:
    secretKeyRef:
      name: {{ required "postgres.existingSecret" .Values.postgres.existingSecret }}
      key: {{ .Values.postgres.secretKey }}
{{- if eq .Values.vault.auth.method "approle" }}
- name: CREDBROKER__VAULT__AUTH__ROLE_ID
  valueFrom:
    secretKeyRef:
      name: {{ required "vault.auth.existingSecret" .Values.vault.auth.existingSecret }}
      key: role_id
- name: CREDBROKER__VAULT__AUTH__SECRET_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.vault.auth.existingSecret }}
      key: secret_id
{{- else if eq .Values.vault.auth.method "token" }}
- name: CREDBROKER__VAULT__AUTH__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ required "vault.auth.existingSecret" .Values.vault.auth.existingSecret }}
      key: token
{{- end }}
{{- if .Values.auth.hs256.existingSecret }}
- name: CREDBROKER__AUTH__HS256_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.hs256.existingSecret }}
      key: {{ .Values.auth.hs256.secretKey }}
{{- end }}
{{- end -}}
