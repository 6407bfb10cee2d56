#!/bin/sh
# Print a deploy/.env with fresh random keys and their SHA-256 digests:  ./new-env.sh > .env
# Keeps nothing else; edit HF_TOKEN, TS_AUTHKEY and MODELS_DIR afterwards.
set -eu
key() { printf 'my-%s' "$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"; }
digest() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
secret() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }
admin=$(key); webui=$(key); metrics=$(key)
umask 077
cat <<END
# made by new-env.sh on $(date -u +%Y-%m-%dT%H:%MZ); keep it secret, never commit it
MODELYARD_ADMIN_KEY=$admin
MODELYARD_ADMIN_KEY_SHA256=$(digest "$admin")
OPENWEBUI_API_KEY=$webui
OPENWEBUI_API_KEY_SHA256=$(digest "$webui")
WEBUI_SECRET_KEY=$(secret)
PROMETHEUS_METRICS_KEY=$metrics
PROMETHEUS_METRICS_KEY_SHA256=$(digest "$metrics")
GRAFANA_ADMIN_PASSWORD=$(secret)
HF_TOKEN=
TS_AUTHKEY=
TS_HOSTNAME=modelyard
MODELS_DIR=/srv/llm/models
END
