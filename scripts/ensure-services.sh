#!/usr/bin/env bash
# Start the local Postgres, Redis and MariaDB that the tests use, when they are installed but down.
# Idempotent; prints what it did. Ports: Postgres 5432, Redis 6379, MariaDB 3306 (127.0.0.1).
set -u

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    up "$port" && return 0
    sleep 0.5
  done
  echo "ensure-services: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

status=0
if ! up 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_up 5432 PostgreSQL || status=1
  else
    echo "ensure-services: PostgreSQL is not installed" >&2; status=1
  fi
fi
if ! up 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "ensure-services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_up 6379 Redis || status=1
  else
    echo "ensure-services: Redis is not installed" >&2; status=1
  fi
fi
if ! up 3306; then
  if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; then
    echo "ensure-services: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    wait_up 3306 MariaDB || status=1
  else
    echo "ensure-services: MariaDB is not installed" >&2; status=1
  fi
fi
# The tests use database "test" in Postgres (trust auth as user postgres).
if up 5432 && command -v psql >/dev/null 2>&1; then
  if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -d postgres -c 'create database test' >/dev/null 2>&1 || true
  fi
fi
exit $status
