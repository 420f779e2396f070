#!/usr/bin/env bash
# Starts two `kvc serve` replicas (ports 8081, 8082) and nginx with deploy/nginx.conf on
# 127.0.0.1:8080, sends concurrent requests through nginx, checks that every answer
# equals the one a replica gives directly and that both replicas served requests, then
# stops everything. Needs nginx (Debian: apt-get install nginx-light) and a built kvc.
#
# Usage: deploy/replicas.sh [path/to/kvc] [model spec]
set -euo pipefail
cd "$(dirname "$0")/.."
kvc=${1:-target/release/kvc}
model=${2:-models/smollm2-135m.ron}
command -v nginx >/dev/null || { echo "nginx not found (apt-get install nginx-light)" >&2; exit 1; }
[ -x "$kvc" ] || { echo "$kvc not found (cargo build --release)" >&2; exit 1; }

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

for port in 8081 8082; do
    "$kvc" serve "$model" --port "$port" --batch 4 2>"/tmp/kvc-replica-$port.log" &
    pids+=($!)
done
for port in 8081 8082; do
    for _ in $(seq 600); do
        grep -q "listening on" "/tmp/kvc-replica-$port.log" 2>/dev/null && break
        sleep 0.5
    done
    grep -q "listening on" "/tmp/kvc-replica-$port.log" || { cat "/tmp/kvc-replica-$port.log"; exit 1; }
done
nginx -p "$PWD" -c deploy/nginx.conf -g 'daemon off;' &
pids+=($!)
sleep 1

body() { printf '{"prompt": "%s", "max_tokens": 12, "temperature": 0}' "$1"; }
prompts=("The capital of France is" "1, 2, 3," "Once upon a time" "def fibonacci(n):" \
         "The three primary colors are" "A list of fruits: apple," "The capital of Italy is" "10, 20, 30,")
dir=$(mktemp -d)
clients=()
for i in "${!prompts[@]}"; do
    curl -sf http://127.0.0.1:8080/v1/completions -d "$(body "${prompts[$i]}")" >"$dir/lb-$i.json" &
    clients+=($!)
done
for c in "${clients[@]}"; do wait "$c"; done
fail=0
for i in "${!prompts[@]}"; do
    direct=$(curl -sf http://127.0.0.1:8081/v1/completions -d "$(body "${prompts[$i]}")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])')
    via=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["text"])' "$dir/lb-$i.json")
    if [ "$direct" != "$via" ]; then
        echo "MISMATCH for ${prompts[$i]}: direct '$direct' via nginx '$via'"; fail=1
    fi
done
# Each replica counts the requests it finished (the direct ones all went to 8081).
a=$(curl -sf http://127.0.0.1:8081/metrics | awk '/^kvc_requests_finished_total/ {print $2}')
b=$(curl -sf http://127.0.0.1:8082/metrics | awk '/^kvc_requests_finished_total/ {print $2}')
echo "through nginx: ${#prompts[@]} requests; replica 8081 finished $a (with ${#prompts[@]} direct), replica 8082 finished $b"
[ "$b" -gt 0 ] || { echo "replica 8082 served nothing"; fail=1; }
# Streaming passes through unbuffered.
curl -sfN http://127.0.0.1:8080/v1/chat/completions \
    -d '{"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0, "stream": true}' \
    | grep -c '^data: ' | xargs -I{} echo "streamed through nginx: {} SSE events"
[ "$fail" = 0 ] && echo "ok: answers through nginx equal direct answers; both replicas served"
exit "$fail"
