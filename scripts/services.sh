#!/usr/bin/env bash
# Local services for pgderive without Docker: PostgreSQL 15 + wal2json (5433), Redis 7 (6380),
# OpenSearch 2.x single node (9201), all bound to 127.0.0.1 with their data under .services/.
#
#   scripts/services.sh up      install what is missing, start what is not answering, wait
#   scripts/services.sh down    stop the instances this script started
#   scripts/services.sh status  one line per service
#
# Idempotent: a service already answering on its port is reused, not fought over.
# Postgres and OpenSearch refuse to run as root, so under root they run as the system user
# $PGDERIVE_SERVICE_USER (default: pgderive), created on demand.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SVC=${PGDERIVE_SERVICES_DIR:-$ROOT/.services}
PG_PORT=${PG_PORT:-5433}
REDIS_PORT=${REDIS_PORT:-6380}
OS_PORT=${OS_PORT:-9201}
OS_VERSION=${OPENSEARCH_VERSION:-2.19.1}
OS_HEAP=${OPENSEARCH_HEAP:-768m}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SERVICE_USER=${PGDERIVE_SERVICE_USER:-pgderive}
MAVEN=${MAVEN_CENTRAL:-https://repo1.maven.org/maven2}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_user() {
  # Run a command as the unprivileged service user when we are root, else as ourselves.
  if [ "$(id -u)" -eq 0 ]; then
    su -s /bin/bash "$SERVICE_USER" -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

wait_for() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local i
  for ((i = 0; i < secs * 2; i++)); do
    if "$@" >/dev/null 2>&1; then log "$name is up"; return 0; fi
    sleep 0.5
  done
  die "$name did not answer within ${secs}s (see logs under $SVC/log)"
}

apt_install() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    # "deinstall ok config-files" (removed, configuration kept) counts as missing.
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root or install them)"
  log "installing ${missing[*]}"
  if [ ! -f "$SVC/.apt-updated" ]; then
    apt-get update -q >/dev/null
    touch "$SVC/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_user() {
  [ "$(id -u)" -eq 0 ] || return 0
  id "$SERVICE_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
}

# ---------------------------------------------------------------------------------------------
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

pg_up() {
  if port_open "$PG_PORT"; then log "postgres: reusing the server on :$PG_PORT"; return 0; fi
  local data=$SVC/pg/data run=$SVC/pg/run
  mkdir -p "$SVC/pg" "$run" "$SVC/log"
  [ "$(id -u)" -eq 0 ] && chown -R "$SERVICE_USER" "$SVC/pg" "$SVC/log"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "postgres: initdb in $data"
    as_user "$PG_BIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$data/postgresql.conf" <<EOF
# --- pgderive local test instance ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$run'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
wal_sender_timeout = 60s
max_connections = 100
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
EOF
    # Newer minor releases only allow listed libraries as logical decoding output plugins.
    # (grep without -q: an early exit would SIGPIPE postgres and fail the pipeline under pipefail)
    if "$PG_BIN/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
      echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" >>"$data/postgresql.conf"
    fi
    cat >"$data/pg_hba.conf" <<EOF
local all         all               trust
local replication all               trust
host  all         all 127.0.0.1/32  trust
host  replication all 127.0.0.1/32  trust
EOF
  fi
  log "postgres: starting on 127.0.0.1:$PG_PORT"
  as_user "$PG_BIN/pg_ctl" -D "$data" -l "$SVC/log/postgres.log" -w -t 60 start >/dev/null
  wait_for postgres 60 pg_ready
}

pg_down() {
  local data=$SVC/pg/data
  if [ -f "$data/postmaster.pid" ]; then
    as_user "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null && log "postgres stopped"
  fi
}

# ---------------------------------------------------------------------------------------------
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

redis_up() {
  if port_open "$REDIS_PORT"; then log "redis: reusing the server on :$REDIS_PORT"; return 0; fi
  mkdir -p "$SVC/redis" "$SVC/log"
  log "redis: starting on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
    --dir "$SVC/redis" --pidfile "$SVC/redis/redis.pid" --logfile "$SVC/log/redis.log" \
    --appendonly yes --appendfsync everysec --save "" >/dev/null
  wait_for redis 30 redis_ready
}

redis_down() {
  if [ -f "$SVC/redis/redis.pid" ] && kill -0 "$(cat "$SVC/redis/redis.pid")" 2>/dev/null; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    log "redis stopped"
  fi
}

# ---------------------------------------------------------------------------------------------
os_ready() { curl -fsS "http://127.0.0.1:$OS_PORT/_cluster/health?wait_for_status=yellow&timeout=1s" >/dev/null; }

os_up() {
  if port_open "$OS_PORT"; then log "opensearch: reusing the server on :$OS_PORT"; return 0; fi
  local home=$SVC/opensearch-$OS_VERSION zip=$SVC/cache/opensearch-$OS_VERSION.zip
  mkdir -p "$SVC/cache" "$SVC/log" "$SVC/opensearch-data" "$SVC/opensearch-run"
  if [ ! -f "$zip" ]; then
    local url=$MAVEN/org/opensearch/distribution/integ-test-zip/opensearch/$OS_VERSION/opensearch-$OS_VERSION.zip
    log "opensearch: downloading $url"
    curl -fsSL --retry 3 -o "$zip.part" "$url"
    mv "$zip.part" "$zip"
  fi
  if [ ! -x "$home/bin/opensearch" ]; then
    (cd "$SVC" && unzip -q -o "$zip")
    cat >>"$home/config/opensearch.yml" <<EOF
# --- pgderive local test instance ---
cluster.name: pgderive-local
node.name: pgderive-local-1
network.host: 127.0.0.1
http.port: $OS_PORT
transport.port: $((OS_PORT + 100))
discovery.type: single-node
path.data: $SVC/opensearch-data
path.logs: $SVC/log/opensearch
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: false
EOF
    # The security plugin is not part of integ-test-zip; drop it if a fuller distribution is used.
    rm -rf "$home/plugins/opensearch-security"
  fi
  [ "$(id -u)" -eq 0 ] && chown -R "$SERVICE_USER" "$home" "$SVC/opensearch-data" "$SVC/opensearch-run" "$SVC/log"
  local java_home=${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")}
  log "opensearch $OS_VERSION: starting on 127.0.0.1:$OS_PORT (heap $OS_HEAP)"
  as_user env OPENSEARCH_JAVA_HOME="$java_home" JAVA_HOME="$java_home" \
    OPENSEARCH_JAVA_OPTS="-Xms$OS_HEAP -Xmx$OS_HEAP" \
    "$home/bin/opensearch" -d -p "$SVC/opensearch-run/opensearch.pid" >"$SVC/log/opensearch-start.log" 2>&1 \
    || die "opensearch failed to start: $(tail -5 "$SVC/log/opensearch-start.log")"
  wait_for opensearch 180 os_ready
}

os_down() {
  local pidfile=$SVC/opensearch-run/opensearch.pid pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    log "opensearch stopped"
  fi
}

# ---------------------------------------------------------------------------------------------
status_line() { # name port check...
  local name=$1 port=$2; shift 2
  if "$@" >/dev/null 2>&1; then printf '%-11s up    127.0.0.1:%s\n' "$name" "$port"
  else printf '%-11s down  127.0.0.1:%s\n' "$name" "$port"; fi
}

cmd=${1:-up}
case "$cmd" in
  up)
    mkdir -p "$SVC"
    # haproxy: the TLS terminator tests/integration/test_tls.py puts in front of OpenSearch
    # (the integ-test distribution has no security plugin); openssl makes the test's CA.
    # prometheus (and its promtool) scrapes a daemon in tests/integration/test_monitoring.py,
    # started by the test on a free port; chromium renders the status page there.
    # graphviz: `dot` renders `pgderive lineage --format dot` (tests/integration/test_lineage.py).
    apt_install postgresql-15 postgresql-15-wal2json redis-server \
      openjdk-17-jre-headless curl unzip haproxy openssl prometheus chromium graphviz
    ensure_user
    pg_up
    redis_up
    os_up
    ;;
  down)
    os_down; redis_down; pg_down ;;
  status)
    status_line postgres "$PG_PORT" pg_ready
    status_line redis "$REDIS_PORT" redis_ready
    status_line opensearch "$OS_PORT" os_ready
    ;;
  *) die "usage: $0 up|down|status" ;;
esac
