#!/usr/bin/env bash
# Local services for pgderive without Docker: PostgreSQL 15 + wal2json (5433), Redis 7 (6380),
# OpenSearch 2.x single node (9201), Apache Kafka 4.x single KRaft node (9093, its controller on
# 9094), all bound to 127.0.0.1 with their data under .services/.
#
#   scripts/services.sh up      install what is missing, start what is not answering, wait
#   scripts/services.sh down    stop the instances this script started
#   scripts/services.sh status  one line per service
#
# PGDERIVE_SERVICES picks the services `up` starts (default: "postgres redis opensearch kafka"),
# e.g. PGDERIVE_SERVICES="postgres redis opensearch" to go without Kafka.
# Idempotent: a service already answering on its port is reused, not fought over.
# Postgres, OpenSearch and Kafka do not run as root here: under root they run as the system user
# $PGDERIVE_SERVICE_USER (default: pgderive), created on demand.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SVC=${PGDERIVE_SERVICES_DIR:-$ROOT/.services}
PG_PORT=${PG_PORT:-5433}
REDIS_PORT=${REDIS_PORT:-6380}
OS_PORT=${OS_PORT:-9201}
OS_VERSION=${OPENSEARCH_VERSION:-2.19.1}
OS_HEAP=${OPENSEARCH_HEAP:-768m}
KAFKA_PORT=${KAFKA_PORT:-9093}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}
KAFKA_HEAP=${KAFKA_HEAP:-512m}
LOG4J_VERSION=${LOG4J_VERSION:-2.24.3}
SERVICES=${PGDERIVE_SERVICES:-postgres redis opensearch kafka}
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
# Kafka: the broker's jars come from Maven Central through a throwaway pom (kafka_2.13 and its
# runtime dependencies, plus log4j 2 as the backend of its SLF4J 1.7) copied into $home/libs; no
# tarball. The jars are resolved again when the pom changes (KAFKA_VERSION, LOG4J_VERSION).
kafka_ready() {
  # A Kafka ApiVersions v0 request (correlation id 1): the broker answers once it serves
  # requests, not merely when its port accepts connections. Expect: length, correlation id 1,
  # error code 0.
  local reply
  reply=$(
    exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT" || exit 1
    printf '\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x01\x00\x00' >&3
    timeout 3 head -c 10 <&3 | od -An -v -tx1 | tr -d ' \n'
  ) || return 1
  [ "${reply:8:12}" = 000000010000 ]
}

kafka_install() { # home
  local home=$1
  mkdir -p "$home/libs" "$SVC/cache/m2"
  cat >"$home/pom.xml.new" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/services.sh: only to resolve the Kafka broker's jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.pgderive</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <repositories><repository><id>central</id><url>$MAVEN</url></repository></repositories>
  <pluginRepositories><pluginRepository><id>central</id><url>$MAVEN</url></pluginRepository></pluginRepositories>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId><version>3.8.1</version>
  </plugin></plugins></build>
</project>
EOF
  if [ -f "$home/libs/.complete" ] && cmp -s "$home/pom.xml.new" "$home/pom.xml"; then
    rm -f "$home/pom.xml.new"; return 0
  fi
  mv "$home/pom.xml.new" "$home/pom.xml"
  rm -f "$home/libs/.complete"
  log "kafka $KAFKA_VERSION: resolving the broker's jars from $MAVEN"
  rm -f "$home/libs/"*.jar
  mvn -B -q -f "$home/pom.xml" -Dmaven.repo.local="$SVC/cache/m2" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$home/libs" >"$SVC/log/kafka-install.log" 2>&1 \
    || die "kafka: mvn could not resolve the jars: $(tail -5 "$SVC/log/kafka-install.log")"
  [ -f "$home/libs/kafka_2.13-$KAFKA_VERSION.jar" ] || die "kafka: kafka_2.13-$KAFKA_VERSION.jar missing in $home/libs"
  touch "$home/libs/.complete"
}

kafka_up() {
  if port_open "$KAFKA_PORT"; then log "kafka: reusing the server on :$KAFKA_PORT"; return 0; fi
  local home=$SVC/kafka-$KAFKA_VERSION data=$SVC/kafka-data run=$SVC/kafka-run
  mkdir -p "$home/config" "$data" "$run" "$SVC/log/kafka"
  kafka_install "$home"
  # Written on every start, so KAFKA_PORT / KAFKA_CONTROLLER_PORT overrides apply.
  cat >"$home/config/server.properties" <<EOF
# --- pgderive local test instance: one node that is both broker and KRaft controller ---
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=67108864
EOF
  cat >"$home/config/log4j2.properties" <<EOF
# Broker log: INFO to $SVC/log/kafka/server.log (rolled at 20 MB, 3 kept), nothing on stdout.
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $SVC/log/kafka/server.log
appender.file.filePattern = $SVC/log/kafka/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka-request.name = kafka.request.logger
logger.kafka-request.level = WARN
logger.state-change.name = state.change.logger
logger.state-change.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = WARN
logger.log-cleaner.name = kafka.log.LogCleaner
logger.log-cleaner.level = WARN
# The full configuration dumps (some 2,000 lines a start).
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
  # java with the broker's classpath, heap and log configuration (also runs the storage tool).
  mkdir -p "$home/bin"
  cat >"$home/bin/kafka-java" <<EOF
#!/usr/bin/env bash
# Written by scripts/services.sh.
here=\$(cd "\$(dirname "\$0")/.." && pwd)
exec java -Xms$KAFKA_HEAP -Xmx$KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \\
  -Dlog4j2.configurationFile="\$here/config/log4j2.properties" -cp "\$here/libs/*" "\$@"
EOF
  chmod +x "$home/bin/kafka-java"
  [ "$(id -u)" -eq 0 ] && chown -R "$SERVICE_USER" "$home" "$data" "$run" "$SVC/log"
  if [ ! -f "$data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(as_user "$home/bin/kafka-java" kafka.tools.StorageTool random-uuid 2>"$SVC/log/kafka-format.log") \
      || die "kafka: the storage tool could not make a cluster id: $(tail -5 "$SVC/log/kafka-format.log")"
    log "kafka: formatting $data (cluster id $cluster_id)"
    as_user "$home/bin/kafka-java" kafka.tools.StorageTool format -t "$cluster_id" -c "$home/config/server.properties" \
      >>"$SVC/log/kafka-format.log" 2>&1 || die "kafka: formatting failed: $(tail -5 "$SVC/log/kafka-format.log")"
  fi
  log "kafka $KAFKA_VERSION: starting on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT, heap $KAFKA_HEAP)"
  # setsid: the broker outlives this script's session; the pid file holds the JVM's own pid.
  rm -f "$run/kafka.pid"
  as_user setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-launch "$run/kafka.pid" \
    "$home/bin/kafka-java" kafka.Kafka "$home/config/server.properties" \
    </dev/null >>"$SVC/log/kafka-start.log" 2>&1 &
  local i pid=
  for ((i = 0; i < 360; i++)); do # first start of the JVM included: up to 180 s
    if kafka_ready 2>/dev/null; then log "kafka is up"; return 0; fi
    [ -z "$pid" ] && [ -f "$run/kafka.pid" ] && pid=$(cat "$run/kafka.pid")
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      die "kafka exited while starting: $(tail -5 "$SVC/log/kafka-start.log" "$SVC/log/kafka/server.log" 2>/dev/null)"
    fi
    sleep 0.5
  done
  die "kafka did not answer within 180s (see logs under $SVC/log/kafka)"
}

kafka_down() {
  local pidfile=$SVC/kafka-run/kafka.pid pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "kafka stopped"
  fi
  rm -f "$pidfile"
}

# ---------------------------------------------------------------------------------------------
status_line() { # name port check...
  local name=$1 port=$2; shift 2
  if "$@" >/dev/null 2>&1; then printf '%-11s up    127.0.0.1:%s\n' "$name" "$port"
  else printf '%-11s down  127.0.0.1:%s\n' "$name" "$port"; fi
}

want() { case " $SERVICES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

cmd=${1:-up}
case "$cmd" in
  up)
    for svc in $SERVICES; do
      case "$svc" in postgres|redis|opensearch|kafka) ;; *) die "PGDERIVE_SERVICES: unknown service '$svc' (postgres redis opensearch kafka)" ;; esac
    done
    mkdir -p "$SVC"
    # haproxy: the TLS terminator tests/integration/test_tls.py puts in front of OpenSearch
    # (the integ-test distribution has no security plugin); openssl makes the test's CA.
    # prometheus (and its promtool) scrapes a daemon in tests/integration/test_monitoring.py,
    # started by the test on a free port; chromium renders the status page there.
    # graphviz: `dot` renders `pgderive lineage --format dot` (tests/integration/test_lineage.py).
    # maven resolves the Kafka broker's jars.
    apt_install postgresql-15 postgresql-15-wal2json redis-server \
      openjdk-17-jre-headless curl unzip haproxy openssl prometheus chromium graphviz maven
    ensure_user
    if want postgres; then pg_up; fi
    if want redis; then redis_up; fi
    if want opensearch; then os_up; fi
    if want kafka; then kafka_up; fi
    ;;
  down)
    kafka_down; os_down; redis_down; pg_down ;;
  status)
    status_line postgres "$PG_PORT" pg_ready
    status_line redis "$REDIS_PORT" redis_ready
    status_line opensearch "$OS_PORT" os_ready
    status_line kafka "$KAFKA_PORT" kafka_ready
    ;;
  *) die "usage: $0 up|down|status" ;;
esac
