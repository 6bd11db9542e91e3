#!/usr/bin/env bash
# The local Google Pub/Sub emulator (the one shipped with google-cloud-cli): up | down | status.
#
#   scripts/pubsub.sh up       start it in the background on $PUBSUB_HOST_PORT, wait until ready
#   scripts/pubsub.sh down     stop it (the whole process group) and wait until the port is free
#   scripts/pubsub.sh status   print running/stopped; exit 0 when running, 1 when stopped
#
# Start time: `up` is ready in 1.3-3.8 s (median ~2 s over 12 runs) on a 2-core machine with
# load ~4 from a training run, measured from the call to the emulator's first HTTP answer; the
# very first `up` takes ~6 s because it also compiles the shim below (cached afterwards).
# `gcloud beta emulators pubsub start` took 2.5 s in the same spot: no faster, and it puts a
# gcloud Python process between us and java, so we run java ourselves.
#
# The shim: emulator 0.8.20 (google-cloud-cli 528) bundles a grpc-core newer than its
# grpc-api, so every client-side cancel of an RPC (closing a streaming pull, a pull that times
# out) dies in the server with NoSuchMethodError InternalStatus.asRuntimeException(...). The
# server then never forgets that stream and keeps pushing messages into it: after a consumer
# closes, the next consumer of the same subscription may get nothing (not even new messages)
# until the ack deadline expires. We compile the one missing method into a class placed
# before the jar on the classpath (in the state dir; nothing installed is changed). Emulators
# whose grpc-api already has the method run unchanged.
#
# The emulator keeps everything in memory: `down` forgets all topics and subscriptions.
#
# Environment:
#   FMNIST_STATE         state dir (default <repo>/.state); this script uses $FMNIST_STATE/pubsub
#   PUBSUB_HOST_PORT     where to listen (default 127.0.0.1:8085)
#   PUBSUB_PROJECT       project written to $FMNIST_STATE/pubsub/data/env (default fmnist-local);
#                        the emulator itself accepts any project id
#   PUBSUB_EMULATOR_JAR  the emulator's jar (default: found under the installed google-cloud-sdk)
#   PUBSUB_JAVA_OPTS     extra JVM options
#   PUBSUB_READY_S       how long `up` waits for readiness (default 60)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${FMNIST_STATE:-$repo/.state}/pubsub"
pid_file="$state/emulator.pid"
addr_file="$state/emulator.addr"  # where the running emulator listens (PUBSUB_HOST_PORT of `up`)
log_file="$state/emulator.log"
data_dir="$state/data"
host_port="${PUBSUB_HOST_PORT:-127.0.0.1:8085}"
host="${host_port%:*}"
port="${host_port##*:}"
project="${PUBSUB_PROJECT:-fmnist-local}"
ready_s="${PUBSUB_READY_S:-60}"
main_class="com.google.cloud.pubsub.testing.v1.Main"

find_jar() {
  if [[ -n "${PUBSUB_EMULATOR_JAR:-}" ]]; then
    if [[ ! -f "$PUBSUB_EMULATOR_JAR" ]]; then
      echo "pubsub.sh: PUBSUB_EMULATOR_JAR=$PUBSUB_EMULATOR_JAR does not exist." >&2
      exit 2
    fi
    echo "$PUBSUB_EMULATOR_JAR"
    return
  fi
  local sdk jar
  for sdk in /usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk /opt/google-cloud-sdk \
             "$(dirname "$(dirname "$(readlink -f "$(command -v gcloud || echo /nonexistent)")")")"; do
    for jar in "$sdk"/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar; do
      if [[ -f "$jar" ]]; then
        echo "$jar"
        return
      fi
    done
  done
  echo "pubsub.sh: the Pub/Sub emulator is not installed." >&2
  echo "Install it with \`gcloud components install pubsub-emulator\` (or the apt package" \
       "google-cloud-cli-pubsub-emulator), or point PUBSUB_EMULATOR_JAR at its jar." >&2
  exit 2
}

# Prints the classpath entry of the shim for this jar ("" when the jar needs none), building
# it on first use. See the comment at the top.
shim_for() {
  local jar="$1" dir
  dir="$state/shim/$(basename "$jar" .jar)"
  if [[ -f "$dir/not-needed" ]]; then
    return
  fi
  if [[ ! -f "$dir/classes/io/grpc/InternalStatus.class" ]]; then
    mkdir -p "$dir/src/io/grpc"
    if ! command -v javap >/dev/null || ! command -v javac >/dev/null; then
      echo "pubsub.sh: no javac/javap: running the emulator without its grpc shim (a closed" \
           "consumer may keep receiving messages; see the top of $0)." >&2
      return
    fi
    if javap -cp "$jar" io.grpc.InternalStatus 2>/dev/null \
        | grep -q 'asRuntimeException(io.grpc.Status, io.grpc.Metadata, boolean)'; then
      touch "$dir/not-needed"
      return
    fi
    cat >"$dir/src/io/grpc/InternalStatus.java" <<'JAVA'
package io.grpc;

/** grpc-api's InternalStatus plus the method that the emulator's newer grpc-core calls. */
public final class InternalStatus {
  private InternalStatus() {}

  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;
  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
      Status status, Metadata trailers) {
    return new InternalStatusRuntimeException(status, trailers);
  }

  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean withStackTrace) {
    return withStackTrace ? new StatusRuntimeException(status, trailers)
        : new InternalStatusRuntimeException(status, trailers);
  }
}
JAVA
    if ! javac --release 11 -nowarn -cp "$jar" -d "$dir/classes" \
        "$dir/src/io/grpc/InternalStatus.java" >&2; then
      echo "pubsub.sh: could not compile the grpc shim; running the emulator without it." >&2
      return
    fi
  fi
  echo "$dir/classes"
}

# The pid recorded by `up`, if that process is still alive and still the emulator (a stale
# pid file must never make `down` signal someone else's process).
running_pid() {
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  ps -o args= -p "$pid" 2>/dev/null | grep -q -e "$main_class" -e "setsid bash -c" || return 1
  echo "$pid"
}

answers() {
  curl -s --max-time 1 -o /dev/null "http://${1:-$host_port}/"
}

port_busy() {
  local addr="${1:-$host_port}"
  (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null
}

running_addr() {
  cat "$addr_file" 2>/dev/null || echo "$host_port"
}

cmd_up() {
  local pid
  if pid="$(running_pid)"; then
    echo "Pub/Sub emulator already running (pid $pid) on $(running_addr)."
    return 0
  fi
  if port_busy; then
    echo "pubsub.sh: $host_port is already in use by a process this script did not start." >&2
    echo "Stop it, or set PUBSUB_HOST_PORT to a free address." >&2
    return 1
  fi
  if ! command -v java >/dev/null; then
    echo "pubsub.sh: java is not installed (the emulator needs Java 11 or newer)." >&2
    exit 2
  fi
  local started jar shim classpath
  started="$EPOCHREALTIME"
  jar="$(find_jar)"
  mkdir -p "$data_dir"
  shim="$(shim_for "$jar")"
  classpath="${shim:+$shim:}$jar"
  # What `gcloud beta emulators pubsub env-init` would print, for other tools to source.
  printf 'PUBSUB_EMULATOR_HOST=%s\nPUBSUB_PROJECT_ID=%s\n' "$host_port" "$project" \
    >"$data_dir/env"
  # setsid: its own session and process group, so it survives this shell and `down` can kill
  # the whole group. The new session leader writes its own pid (= the group id), then execs
  # java, so the recorded pid is the emulator itself.
  rm -f "$pid_file"
  echo "$host_port" >"$addr_file"
  # shellcheck disable=SC2086  # PUBSUB_JAVA_OPTS is a list of options
  nohup setsid bash -c 'cd "$0" && echo $$ >"$1" && shift && exec "$@"' \
    "$data_dir" "$pid_file" java ${PUBSUB_JAVA_OPTS:-} -cp "$classpath" "$main_class" \
    --host="$host" --port="$port" >"$log_file" 2>&1 </dev/null &
  local deadline=$((SECONDS + ready_s))
  until [[ -s "$pid_file" ]] || ((SECONDS >= deadline)); do sleep 0.05; done
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  pid="${pid:-0}"
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "pubsub.sh: the emulator exited during start. Last lines of $log_file:" >&2
      tail -n 30 "$log_file" >&2 || true
      rm -f "$pid_file"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "pubsub.sh: the emulator did not answer on $host_port within ${ready_s}s." \
           "Last lines of $log_file:" >&2
      tail -n 30 "$log_file" >&2 || true
      cmd_down >/dev/null || true
      return 1
    fi
    sleep 0.1  # polling interval of the readiness wait, bounded by the deadline above
  done
  local took
  took="$(awk "BEGIN {print ${EPOCHREALTIME/,/.} - ${started/,/.}}")"
  printf 'Pub/Sub emulator up on %s (pid %s) in %.1fs%s; log: %s\n' \
    "$host_port" "$pid" "$took" "${shim:+ with grpc shim}" "$log_file"
}

cmd_down() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$pid_file" "$addr_file"
    echo "Pub/Sub emulator is not running."
    return 0
  fi
  local addr
  addr="$(running_addr)"
  # The pid is the group leader (setsid); signal the whole group so no java child survives.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 -- "-$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      kill -KILL -- "-$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1  # polling interval of the shutdown wait, bounded by the deadline above
  done
  deadline=$((SECONDS + 5))
  while port_busy "$addr" && ((SECONDS < deadline)); do sleep 0.1; done
  rm -f "$pid_file" "$addr_file"
  if port_busy "$addr"; then
    echo "pubsub.sh: stopped pid $pid but $addr is still in use." >&2
    return 1
  fi
  echo "Pub/Sub emulator stopped (pid $pid)."
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && answers "$(running_addr)"; then
    echo "running (pid $pid) on $(running_addr)"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "starting or unresponsive (pid $pid) on $(running_addr)"
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
