#!/usr/bin/env bash
# One full benchmark run: builds the release binaries (holdfast, and holdfast-bench with the etcd
# adapter), starts the private peers (scripts/bench-peers.sh), runs holdfast-bench with the given
# flags, and stops the peers again, whatever happens.
#
#   bash scripts/bench-run.sh --duration 3s --json target/bench.json
#
# Not part of CI (CI runs `holdfast-bench --smoke` through `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p holdfast -p holdfast-bench --features holdfast-bench/etcd
bash scripts/bench-peers.sh start
trap 'bash scripts/bench-peers.sh stop' EXIT
target/release/holdfast-bench "$@"
