#!/usr/bin/env bash
# CPU profile of a holdfast server and of the benchmark's clients under W1 (uncontended pairs,
# 64 clients): where does the time go: HTTP, JSON, the engine, the store, allocation, the kernel?
#
#   bash scripts/bench-profile.sh [memory|async|sync] [seconds]
#   TRANSPORT=client bash scripts/bench-profile.sh   # holdfast-client over HTTP (default: wire)
#
# Needs `perf` (Debian package linux-perf) and the release binaries
# (cargo build --release -p holdfast -p holdfast-bench). Prints the top symbols and a summary
# grouped by component; the raw profile stays in $OUT (default target/bench-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-memory}
seconds=${2:-5}
bin=${TARGET_DIR:-target}/release
out=${OUT:-target/bench-profile}
mkdir -p "$out"
command -v perf >/dev/null || { apt-get install -y -q linux-perf >/dev/null; }

data=$(mktemp -d /tmp/holdfast-profile.XXXXXX)
"$bin/holdfast" serve --listen 127.0.0.1:0 --durability "$mode" --data-dir "$data/data" \
  >"$data/stdout" 2>"$data/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$data/stdout" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$data/stdout" | head -1)
wire=$(sed -n 's/.*wire protocol on \([^ ]*\).*/\1/p' "$data/stdout" | head -1)
transport=${TRANSPORT:-wire}
echo "profiling holdfast ($mode, pid $server) at $url (wire $wire) over $transport for ${seconds}s"

"$bin/holdfast-bench" --systems "holdfast-$mode" --workloads w1 --w1-clients 64 \
  --warmup 1s --duration "$((seconds + 2))s" --holdfast-url "$url" --holdfast-wire "$wire" \
  --holdfast-transport "$transport" >"$out/bench.md" 2>/dev/null &
bench=$!
sleep 1.5
# The server and the benchmark's clients (holdfast-client over reqwest), side by side.
perf record -e cpu-clock -F 999 -g -p "$server" -o "$out/server.perf.data" -- sleep "$seconds" 2>/dev/null &
perf record -e cpu-clock -F 999 -g -p "$bench" -o "$out/clients.perf.data" -- sleep "$seconds" 2>/dev/null
wait $bench
grep -E '^\| holdfast' "$out/bench.md" || true

for side in server clients; do
perf report -i "$out/$side.perf.data" --no-children --sort sym -g none --stdio >"$out/$side.report.txt" 2>/dev/null
grep -E '^ +[0-9]' "$out/$side.report.txt" >"$out/$side.symbols.txt" || true
echo "== $side: top symbols (self time)"; sed -n 1,25p "$out/$side.symbols.txt"

# Self time grouped by component, from the symbol names.
echo "== $side: self time by component"
awk '
    { pct = $1; sub(/%/, "", pct); line = $0 }
    line ~ /\[k\]/                                          { g["kernel (syscalls, TCP loopback, scheduling)"] += pct; next }
    line ~ /hyper|h2::|httparse|http::|tower|axum|bytes::|reqwest|url::/ { g["HTTP (hyper/axum/tower/reqwest)"] += pct; next }
    line ~ /serde|json/                                     { g["JSON (serde_json)"] += pct; next }
    line ~ /holdfast_core/                                  { g["engine (holdfast_core)"] += pct; next }
    line ~ /redb|postcard/                                  { g["store (redb/postcard)"] += pct; next }
    line ~ /tokio|parking_lot|crossbeam|mio/               { g["runtime (tokio)"] += pct; next }
    line ~ /malloc|free|realloc|memcpy|memmove|alloc/      { g["allocation and copying"] += pct; next }
    line ~ /holdfast_server|holdfast::/                     { g["server glue (holdfast_server)"] += pct; next }
                                                            { g["other"] += pct }
    END { for (k in g) printf "%6.1f%%  %s\n", g[k], k }' "$out/$side.symbols.txt" | sort -rn | tee "$out/$side.components.txt"
done
