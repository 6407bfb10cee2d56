#!/usr/bin/env bash
# A fast OpenAI-shaped upstream for the proxy benchmark: nginx answering a fixed completion,
# or (with `sse`) a fixed stream of EVENTS chat-completion chunks, a usage chunk and [DONE].
# Usage: upstream_nginx.sh PORT [sse [EVENTS]]   (the gateway starts it like any engine)
set -euo pipefail
port="$1"
mode="${2:-json}"
events="${3:-400}"
dir="$(mktemp -d /tmp/modelyard-bench-nginx.XXXXXX)"
mkdir -p "$dir/logs" "$dir/www"
chmod 755 "$dir" "$dir/www"  # nginx workers run as nobody when started by root
if [ "$mode" = sse ]; then
  # nginx serves a static file only to GET: a POST's 405 becomes an internal GET of the file.
  answer='root www; default_type text/event-stream; try_files /sse.txt =404; error_page 405 =200 /sse.txt;'
  for ((i = 0; i < events; i++)); do
    printf 'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":0,"model":"sse","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
  done > "$dir/www/sse.txt"
  printf 'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":0,"model":"sse","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n' \
    "$events" "$((events + 3))" >> "$dir/www/sse.txt"
else
  answer="default_type application/json; return 200 '{\"id\":\"cmpl-1\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"fast\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}';"
fi
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
error_log stderr warn;
pid $dir/nginx.pid;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/body;
  server {
    listen 127.0.0.1:$port reuseport backlog=4096;
    location = /health { return 200 "ok"; }
    location = /v1/models {
      default_type application/json;
      return 200 '{"object":"list","data":[{"id":"$mode","object":"model"}]}';
    }
    location = /sse.txt { root www; default_type text/event-stream; }
    location / { $answer }
  }
}
CONF
# nginx as a child, not exec'd: its directory is removed when it stops (the gateway stops an
# engine by signalling its process group, which reaches this shell too).
nginx -p "$dir" -c "$dir/nginx.conf" -g "daemon off;" &
nginx_pid=$!
trap 'kill -TERM "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" || true; rm -rf "$dir"; exit 0' TERM INT
status=0
wait "$nginx_pid" || status=$?
rm -rf "$dir"
exit "$status"
