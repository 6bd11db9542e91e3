#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft: broker + controller in one JVM), no Docker.
#
#   scripts/kafka.sh up       fetch the jars once, format the storage once, start it in the
#                             background, wait until the broker answers
#   scripts/kafka.sh down     stop it (SIGTERM; SIGKILL after $KAFKA_STOP_S), wait for the port
#   scripts/kafka.sh status   print running/stopped; exit 0 when running, 1 when stopped
#
# The broker jars come from Maven Central through scripts/kafka/pom.xml (the Kafka version is
# set there) into a cache outside the work tree. A cold `up` with the jars cached takes 3-5 s
# on a quiet 2-core machine and 7-15 s while it trains a model (see docs/brokers.md). Topics
# and offsets live in the state dir and survive `down`/`up`; delete $FMNIST_STATE/kafka for a
# clean slate.
#
# Environment:
#   FMNIST_CACHE      jar cache (default ~/.cache/fmnist); uses $FMNIST_CACHE/kafka-<version>
#   FMNIST_STATE      state dir (default <repo>/.state); uses $FMNIST_STATE/kafka
#   KAFKA_PORT        client listener on 127.0.0.1 (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller listener on 127.0.0.1 (default 9093)
#   KAFKA_HEAP_OPTS   JVM heap (default -Xms256m -Xmx768m)
#   KAFKA_READY_S     how long `up` waits for readiness (default 60)
#   KAFKA_STOP_S      how long `down` waits after SIGTERM before SIGKILL (default 30)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pom="$repo/scripts/kafka/pom.xml"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
cache="${FMNIST_CACHE:-$HOME/.cache/fmnist}/kafka-$version"
libs="$cache/libs"
state="${FMNIST_STATE:-$repo/.state}/kafka"
pid_file="$state/kafka.pid"
out_file="$state/kafka.out"   # the JVM's own stdout/stderr (crashes, bad flags)
log_file="$state/logs/server.log"
props="$state/server.properties"
host=127.0.0.1
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-9093}"
ready_s="${KAFKA_READY_S:-60}"
stop_s="${KAFKA_STOP_S:-30}"
python="$repo/.venv/bin/python"
log_mark=1

die() {
  echo "kafka.sh: $1" >&2
  exit "${2:-1}"
}

fetch_jars() {
  local want
  want="$(sha256sum "$pom" | cut -c1-16)"  # fetch again when the pom changes
  [[ "$(cat "$libs/.complete" 2>/dev/null)" == "$want" ]] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch the Kafka $version jars." 2
  echo "Fetching the Kafka $version jars into $libs (once) ..."
  rm -rf "$libs.tmp"
  mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
    -DoutputDirectory="$libs.tmp" || die "mvn could not fetch the jars (Maven Central reachable?)."
  rm -rf "$libs"
  mv "$libs.tmp" "$libs"
  echo "$want" >"$libs/.complete"
}

write_config() {
  mkdir -p "$state/data" "$state/logs"
  cat >"$props" <<EOF
# Written by scripts/kafka.sh; rewritten on every \`up\`.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$host:$controller_port
listeners=PLAINTEXT://$host:$port,CONTROLLER://$host:$controller_port
advertised.listeners=PLAINTEXT://$host:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$state/data
num.partitions=4
# our code creates its topics itself; a typo in a topic name should fail, not create a topic
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=24
log.segment.bytes=67108864
EOF
  cat >"$state/log4j2.properties" <<EOF
# Written by scripts/kafka.sh: the broker logs to $log_file (10 MB x 3).
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $log_file
appender.file.filePattern = $log_file.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

# The JVM command line (without the main class), in the array `jvm`.
set_jvm() {
  local heap
  read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
  jvm=(java "${heap[@]}" -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
       -Dkafka.logs.dir="$state/logs" -Dlog4j2.configurationFile="$state/log4j2.properties"
       -cp "$libs/*")
}

format_once() {
  [[ -f "$state/data/meta.properties" ]] && return 0
  # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding (what
  # `kafka-storage.sh random-uuid` prints); one that starts with '-' would read as a flag.
  local cluster_id=-
  while [[ "$cluster_id" == -* ]]; do
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
  done
  "${jvm[@]}" kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
    --config "$props" >"$state/format.out" 2>&1 \
    || { cat "$state/format.out" >&2; die "formatting $state/data failed."; }
}

# The pid recorded by `up`, if that process is still alive and still our broker.
running_pid() {
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' && echo "$pid"
}

port_busy() {
  (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null
}

# The broker answers a metadata request (it is up, unfenced and serving clients).
answers() {
  port_busy "$port" || return 1
  if [[ -x "$python" ]] && "$python" -c 'import confluent_kafka' 2>/dev/null; then
    "$python" - "$host:$port" >/dev/null 2>&1 <<'EOF'
import sys
from confluent_kafka.admin import AdminClient
AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0}).list_topics(timeout=2)
EOF
  else  # no client library at hand: trust the broker's own "started" line of this run
    [[ -n "$(tail -n +"$log_mark" "$log_file" 2>/dev/null | grep -m1 'Kafka Server started')" ]]
  fi
}

# The last lines this run wrote to the broker's log (earlier runs' lines would mislead).
log_tail() {
  tail -n +"$log_mark" "$log_file" 2>/dev/null | tail -n 30 || true
}

cmd_up() {
  local pid
  if pid="$(running_pid)"; then
    echo "Kafka already running (pid $pid) on $host:$port."
    return 0
  fi
  for p in "$port" "$controller_port"; do
    if port_busy "$p"; then
      echo "kafka.sh: $host:$p is already in use by a process this script did not start" \
           "(a Kafka from docker-compose?)." >&2
      echo "Stop it, or set KAFKA_PORT / KAFKA_CONTROLLER_PORT to free ports." >&2
      return 1
    fi
  done
  command -v java >/dev/null || die "java (17 or newer) is not installed." 2
  fetch_jars
  write_config
  set_jvm
  local started="$EPOCHREALTIME"
  format_once
  rm -f "$pid_file"
  log_mark=$(( $(cat "$log_file" 2>/dev/null | wc -l) + 1 ))  # this run's lines start here
  # setsid: its own session, so it survives this shell; the new session leader writes its own
  # pid and then execs java, so the recorded pid is the broker itself.
  nohup setsid bash -c 'echo $$ >"$0" && exec "$@"' "$pid_file" \
    "${jvm[@]}" kafka.Kafka "$props" >"$out_file" 2>&1 </dev/null &
  local deadline=$((SECONDS + ready_s))
  until [[ -s "$pid_file" ]] || ((SECONDS >= deadline)); do sleep 0.05; done
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  pid="${pid:-0}"
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "kafka.sh: the broker exited during start. Last lines of $out_file and $log_file:" >&2
      tail -n 15 "$out_file" >&2 || true
      log_tail >&2
      rm -f "$pid_file"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "kafka.sh: the broker did not answer on $host:$port within ${ready_s}s." \
           "Last lines of $log_file:" >&2
      log_tail >&2
      cmd_down >/dev/null || true
      return 1
    fi
    sleep 0.2  # polling interval of the readiness wait, bounded by the deadline above
  done
  local took
  took="$(awk "BEGIN {print ${EPOCHREALTIME/,/.} - ${started/,/.}}")"
  printf 'Kafka %s up on %s:%s (pid %s) in %.1fs; log: %s\n' \
    "$version" "$host" "$port" "$pid" "$took" "$log_file"
}

cmd_down() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$pid_file"
    echo "Kafka is not running."
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + stop_s))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "kafka.sh: no clean shutdown within ${stop_s}s; killing pid $pid." >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1  # polling interval of the shutdown wait, bounded by the deadline above
  done
  deadline=$((SECONDS + 5))
  while port_busy "$port" && ((SECONDS < deadline)); do sleep 0.1; done
  rm -f "$pid_file"
  if port_busy "$port"; then
    echo "kafka.sh: stopped pid $pid but $host:$port is still in use." >&2
    return 1
  fi
  echo "Kafka stopped (pid $pid)."
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && answers; then
    echo "running (pid $pid) on $host:$port, Kafka $version"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "starting or unresponsive (pid $pid) on $host:$port"
    return 1
  fi
  echo "stopped"
  return 1
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
