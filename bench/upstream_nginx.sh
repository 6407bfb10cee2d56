#!/usr/bin/env bash
# A fast OpenAI-shaped upstream for the proxy benchmark: nginx answering a fixed completion.
# Usage: upstream_nginx.sh PORT   (the gateway starts it like any engine, with {port})
set -euo pipefail
port="$1"
dir="$(mktemp -d /tmp/modelyard-bench-nginx.XXXXXX)"
mkdir -p "$dir/logs"
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
error_log stderr warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/body;
  server {
    listen 127.0.0.1:$port reuseport backlog=4096;
    location = /health { return 200 "ok"; }
    location = /v1/models {
      default_type application/json;
      return 200 '{"object":"list","data":[{"id":"fast","object":"model"}]}';
    }
    location / {
      default_type application/json;
      return 200 '{"id":"cmpl-1","object":"chat.completion","created":0,"model":"fast","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}';
    }
  }
}
CONF
exec nginx -p "$dir" -c "$dir/nginx.conf" -g "daemon off;"
