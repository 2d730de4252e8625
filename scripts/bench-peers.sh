#!/usr/bin/env bash
# Starts (start) or stops (stop) PRIVATE instances of the benchmark's peers, each on a
# non-standard loopback port with its data under one temporary directory:
#
#   Redis       127.0.0.1:6390  (no persistence: --save "" --appendonly no)
#   PostgreSQL  127.0.0.1:5433  (initdb defaults; max_locks_per_transaction raised for W3)
#   MariaDB     127.0.0.1:3307  (mariadb-install-db defaults)
#   etcd        127.0.0.1:2389 (client), 127.0.0.1:2390 (peer)  (Debian package etcd-server)
#
# `start` writes $STATE/peers.env (HOLDFAST_BENCH_*_URL lines that holdfast-bench reads) and one
# PID file per peer; `stop` signals exactly those PIDs and removes the data. When a private
# instance cannot be started, the env file points at this machine's running service instead and
# says so in a `# fallback:` line (holdfast-bench prints such lines).
#
#   bash scripts/bench-peers.sh start   # idempotent: stops an earlier set first
#   bash scripts/bench-peers.sh stop
#   bash scripts/bench-peers.sh status
set -uo pipefail

STATE=${HOLDFAST_BENCH_PEERS_DIR:-/tmp/holdfast-bench-peers}
ENV_FILE=$STATE/peers.env
REDIS_PORT=6390
PG_PORT=5433
MARIA_PORT=3307
ETCD_CLIENT_PORT=2389
ETCD_PEER_PORT=2390

log() { echo "bench-peers: $*" >&2; }

wait_for() { # wait_for SECONDS COMMAND...
  local seconds=$1; shift
  for _ in $(seq 1 $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

ensure_packages() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v etcdctl >/dev/null || missing+=(etcd-client)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || log "could not install ${missing[*]}"
  fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

start_redis() {
  local dir=$DATA/redis
  mkdir -p "$dir"
  setsid redis-server --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" --daemonize no </dev/null >/dev/null 2>&1 &
  echo $! >"$STATE/redis.pid"
  if wait_for 10 redis-cli -h 127.0.0.1 -p $REDIS_PORT ping; then
    echo "HOLDFAST_BENCH_REDIS_URL=redis://127.0.0.1:$REDIS_PORT" >>"$ENV_FILE"
    log "redis: private instance on 127.0.0.1:$REDIS_PORT (pid $(cat "$STATE/redis.pid"))"
  else
    kill "$(cat "$STATE/redis.pid")" 2>/dev/null; rm -f "$STATE/redis.pid"
    echo "# fallback: redis is the machine's service on 127.0.0.1:6379 (private start failed)" >>"$ENV_FILE"
    echo "HOLDFAST_BENCH_REDIS_URL=redis://127.0.0.1:6379" >>"$ENV_FILE"
    log "redis: private start failed, falling back to 127.0.0.1:6379"
  fi
}

start_postgres() {
  local bin dir=$DATA/postgres
  bin=$(pg_bin)
  mkdir -p "$dir" && chown postgres:postgres "$dir" && chmod 700 "$dir"
  # postgres refuses to run as root: initdb and the server run as the postgres user.
  if [ -n "$bin" ] &&
    runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >"$DATA/postgres-initdb.log" 2>&1 &&
    # W3 holds 100,000 advisory locks at once; the shared lock table holds
    # max_locks_per_transaction x ~120 backends entries, so the default (64) is too small.
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $dir -c max_locks_per_transaction=1024" \
      >/dev/null 2>&1 &&
    wait_for 10 runuser -u postgres -- psql -h 127.0.0.1 -p $PG_PORT -U postgres -c 'select 1' postgres; then
    head -1 "$dir/data/postmaster.pid" >"$STATE/postgres.pid"
    runuser -u postgres -- psql -q -h 127.0.0.1 -p $PG_PORT -U postgres -c 'create database test' postgres >/dev/null 2>&1
    echo "HOLDFAST_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/test" >>"$ENV_FILE"
    log "postgres: private instance on 127.0.0.1:$PG_PORT (pid $(cat "$STATE/postgres.pid"))"
  else
    [ -f "$dir/data/postmaster.pid" ] && kill -INT "$(head -1 "$dir/data/postmaster.pid")" 2>/dev/null
    echo "# fallback: postgres is the machine's service on 127.0.0.1:5432 (private start failed; W3 may exhaust its lock table)" >>"$ENV_FILE"
    echo "HOLDFAST_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test" >>"$ENV_FILE"
    log "postgres: private start failed (see $DATA/postgres-initdb.log, $dir/postgres.log), falling back to 127.0.0.1:5432"
  fi
}

start_mariadb() {
  local dir=$DATA/mariadb
  mkdir -p "$dir"
  if mariadb-install-db --no-defaults --datadir="$dir/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >"$DATA/mariadb-install.log" 2>&1; then
    setsid mariadbd --no-defaults --datadir="$dir/data" --user=root --bind-address=127.0.0.1 \
      --port=$MARIA_PORT --socket="$dir/mariadb.sock" --pid-file="$dir/mariadb.pid" \
      --log-error="$dir/mariadb.err" --skip-name-resolve=0 </dev/null >/dev/null 2>&1 &
    echo $! >"$STATE/mariadb.pid"
  fi
  if [ -f "$STATE/mariadb.pid" ] && wait_for 30 mariadb --no-defaults -uroot -h127.0.0.1 -P$MARIA_PORT -e 'select 1'; then
    mariadb --no-defaults -uroot -h127.0.0.1 -P$MARIA_PORT -e 'create database if not exists test'
    echo "HOLDFAST_BENCH_MYSQL_URL=mysql://root@127.0.0.1:$MARIA_PORT/test" >>"$ENV_FILE"
    log "mariadb: private instance on 127.0.0.1:$MARIA_PORT (pid $(cat "$STATE/mariadb.pid"))"
  else
    [ -f "$STATE/mariadb.pid" ] && kill "$(cat "$STATE/mariadb.pid")" 2>/dev/null
    rm -f "$STATE/mariadb.pid"
    echo "# fallback: mariadb is the machine's service on 127.0.0.1:3306 (private start failed)" >>"$ENV_FILE"
    echo "HOLDFAST_BENCH_MYSQL_URL=mysql://root@127.0.0.1:3306/test" >>"$ENV_FILE"
    log "mariadb: private start failed (see $DATA/mariadb-install.log, $dir/mariadb.err), falling back to 127.0.0.1:3306"
  fi
}

start_etcd() {
  local dir=$DATA/etcd
  mkdir -p "$dir"
  if command -v etcd >/dev/null; then
    setsid etcd --name bench --data-dir "$dir/data" \
      --listen-client-urls http://127.0.0.1:$ETCD_CLIENT_PORT --advertise-client-urls http://127.0.0.1:$ETCD_CLIENT_PORT \
      --listen-peer-urls http://127.0.0.1:$ETCD_PEER_PORT --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER_PORT \
      --initial-cluster bench=http://127.0.0.1:$ETCD_PEER_PORT --initial-cluster-state new \
      </dev/null >"$dir/etcd.log" 2>&1 &
    echo $! >"$STATE/etcd.pid"
  fi
  if [ -f "$STATE/etcd.pid" ] && wait_for 20 env ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$ETCD_CLIENT_PORT endpoint health; then
    echo "HOLDFAST_BENCH_ETCD_ENDPOINT=http://127.0.0.1:$ETCD_CLIENT_PORT" >>"$ENV_FILE"
    log "etcd: private instance on 127.0.0.1:$ETCD_CLIENT_PORT (pid $(cat "$STATE/etcd.pid"))"
  else
    [ -f "$STATE/etcd.pid" ] && kill "$(cat "$STATE/etcd.pid")" 2>/dev/null
    rm -f "$STATE/etcd.pid"
    echo "# unavailable: etcd could not be started (see $dir/etcd.log); its rows will say so" >>"$ENV_FILE"
    log "etcd: could not be started"
  fi
}

stop_all() {
  [ -d "$STATE" ] || return 0
  for peer in redis postgres mariadb etcd; do
    local pidfile=$STATE/$peer.pid pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # PostgreSQL: SIGINT is its "fast" shutdown; the others stop cleanly on SIGTERM.
    if [ "$peer" = postgres ]; then kill -INT "$pid" 2>/dev/null; else kill -TERM "$pid" 2>/dev/null; fi
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$peer (pid $pid) did not stop, sending SIGKILL"; kill -KILL "$pid"; fi
    rm -f "$pidfile"
    log "$peer stopped (pid $pid)"
  done
  if [ -f "$STATE/data_dir" ]; then rm -rf "$(cat "$STATE/data_dir")"; fi
  rm -rf "$STATE"
}

case ${1:-} in
  start)
    stop_all
    ensure_packages
    mkdir -p "$STATE"
    DATA=$(mktemp -d /tmp/holdfast-bench-data.XXXXXX)
    chmod 755 "$DATA"
    echo "$DATA" >"$STATE/data_dir"
    echo "# written by scripts/bench-peers.sh start at $(date -u +%FT%TZ); data under $DATA" >"$ENV_FILE"
    start_redis
    start_postgres
    start_mariadb
    start_etcd
    log "environment in $ENV_FILE"
    ;;
  stop) stop_all ;;
  status)
    if [ -f "$ENV_FILE" ]; then cat "$ENV_FILE"; else echo "no peers started"; fi
    for f in "$STATE"/*.pid; do [ -f "$f" ] && echo "$(basename "$f" .pid): pid $(cat "$f")"; done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
