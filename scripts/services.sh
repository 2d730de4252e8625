#!/usr/bin/env bash
# Checks (and with `ensure`, starts) the local services the tests use, on loopback only.
set -uo pipefail
mode=${1:-check}

pg_up()    { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
maria_up() { mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

start() {
  case $1 in
    postgres) pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start ;;
    mariadb)  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd ;;
    redis)    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
                --dir /var/lib/redis --logfile /var/log/redis/ci.log ;;
  esac
}

for svc in postgres mariadb redis; do
  case $svc in postgres) up=pg_up ;; mariadb) up=maria_up ;; redis) up=redis_up ;; esac
  if $up; then echo "service $svc: up"; continue; fi
  if [ "$mode" = ensure ]; then
    echo "service $svc: down, starting it"
    start $svc >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do $up && break; sleep 1; done
    if $up; then echo "service $svc: up"; else echo "service $svc: could not be started (tests that need it will say so)"; fi
  else
    echo "service $svc: down"
  fi
done
