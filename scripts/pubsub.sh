#!/usr/bin/env bash
# The local Google Pub/Sub emulator (the one shipped with google-cloud-cli): up | down | status.
#
#   scripts/pubsub.sh up       start it in the background on $PUBSUB_HOST_PORT, wait until ready
#   scripts/pubsub.sh down     stop it (SIGTERM to its process group; SIGKILL after
#                              $PUBSUB_STOP_S) and wait until the port is free
#   scripts/pubsub.sh status   print running/stopped; exit 0 when running, 1 when stopped
#   scripts/pubsub.sh installed  print the emulator's jar; exit 2, saying how to install it,
#                              when there is none (or no java)
#
# Start time: `up` is ready in 1.3-3.8 s (median ~2 s over 12 runs) on a 2-core machine with
# load ~4 from a training run, measured from the call to the emulator's first HTTP answer; the
# very first `up` takes ~6 s because it also compiles the shim below (cached in $FMNIST_CACHE,
# shared by every state dir).
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
#   FMNIST_CACHE         cache (default ~/.cache/fmnist); the grpc shim goes to $FMNIST_CACHE/pubsub-shim
#   PUBSUB_HOST_PORT     where to listen (default 127.0.0.1:8085)
#   PUBSUB_PROJECT       project written to $FMNIST_STATE/pubsub/data/env (default fmnist-local);
#                        the emulator itself accepts any project id
#   PUBSUB_EMULATOR_JAR  the emulator's jar (default: found under the installed google-cloud-sdk)
#   PUBSUB_SDK_DIRS      google-cloud-sdk folders searched for it, space-separated (default:
#                        /usr/lib, /usr/share and /opt's google-cloud-sdk, and gcloud's on PATH)
#   PUBSUB_JAVA_OPTS     extra JVM options
#   PUBSUB_READY_S       how long `up` waits for readiness (default 60)
#   PUBSUB_STOP_S        how long `down` waits after SIGTERM before SIGKILL (default 15)
#
# The pid file, `up`'s readiness wait, `down` and `status` live in scripts/lib.sh (shared with
# scripts/kafka.sh).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"
svc=pubsub.sh
title="Pub/Sub emulator"
java_min=11
state="${FMNIST_STATE:-$repo/.state}/pubsub"
pid_file="$state/emulator.pid"
addr_file="$state/emulator.addr"  # where the running emulator listens (PUBSUB_HOST_PORT of `up`)
state_files=("$addr_file")
log_file="$state/emulator.log"
service_out="$log_file"
data_dir="$state/data"
host_port="${PUBSUB_HOST_PORT:-127.0.0.1:8085}"
host="${host_port%:*}"
port="${host_port##*:}"
free_hint="PUBSUB_HOST_PORT to a free address"
project="${PUBSUB_PROJECT:-fmnist-local}"
ready_s="${PUBSUB_READY_S:-60}"
stop_s="${PUBSUB_STOP_S:-15}"
poll_s=0.1
up_note=""
status_note=""
main_class="com.google.cloud.pubsub.testing.v1.Main"
proc_match="${main_class//./\\.}"

find_jar() {
  if [[ -n "${PUBSUB_EMULATOR_JAR:-}" ]]; then
    [[ -f "$PUBSUB_EMULATOR_JAR" ]] \
      || die "PUBSUB_EMULATOR_JAR=$PUBSUB_EMULATOR_JAR does not exist." 2
    echo "$PUBSUB_EMULATOR_JAR"
    return
  fi
  local sdk jar sdks
  sdks="${PUBSUB_SDK_DIRS:-/usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk /opt/google-cloud-sdk
        $(dirname "$(dirname "$(readlink -f "$(command -v gcloud || echo /nonexistent)")")")}"
  for sdk in $sdks; do
    for jar in "$sdk"/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar; do
      if [[ -f "$jar" ]]; then
        echo "$jar"
        return
      fi
    done
  done
  echo "$svc: the Pub/Sub emulator is not installed." >&2
  echo "Install it with \`gcloud components install pubsub-emulator\` (or the apt package" \
       "google-cloud-cli-pubsub-emulator), or point PUBSUB_EMULATOR_JAR at its jar." >&2
  exit 2
}

installed() {
  find_jar
}

# Prints the classpath entry of the shim for this jar ("" when the jar needs none), building
# it on first use. See the comment at the top.
shim_for() {
  local jar="$1" dir
  dir="${FMNIST_CACHE:-$HOME/.cache/fmnist}/pubsub-shim/$(basename "$jar" .jar)"
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

answers() {
  curl -s --max-time 1 -o /dev/null "http://$1/"
}

running_addr() {
  cat "$addr_file" 2>/dev/null || echo "$host_port"
}

listen_addrs() {
  echo "$host_port"
}

show_logs() {
  echo "--- $log_file"
  tail -n 30 "$log_file" 2>/dev/null || true
}

prepare() {
  local jar shim
  jar="$(find_jar)"
  mkdir -p "$data_dir"
  shim="$(shim_for "$jar")"
  up_note="${shim:+ with grpc shim}"
  # What `gcloud beta emulators pubsub env-init` would print, for other tools to source.
  printf 'PUBSUB_EMULATOR_HOST=%s\nPUBSUB_PROJECT_ID=%s\n' "$host_port" "$project" \
    >"$data_dir/env"
  echo "$host_port" >"$addr_file"
  # shellcheck disable=SC2206  # PUBSUB_JAVA_OPTS is a list of options
  service_cmd=(java ${PUBSUB_JAVA_OPTS:-} -cp "${shim:+$shim:}$jar" "$main_class"
               --host="$host" --port="$port")
  service_dir="$data_dir"
}

main "$@"
