# shellcheck shell=bash
# What scripts/kafka.sh and scripts/pubsub.sh share: one local service (a JVM) run in the
# background from a pid file, with `up` (start it, wait until it answers), `down` (SIGTERM to
# its process group, SIGKILL after a timeout, wait until the port is free) and `status`.
# Sourced, not run. The sourcing script sets, before calling `main "$@"`:
#
#   svc          its name in messages ("kafka.sh")
#   title        the service, for people ("Kafka")
#   pid_file     where `up` records the service's pid
#   proc_match   an extended regex the recorded process's command line matches; a stale pid
#                file must never make `down` signal someone else's process
#   log_file     the log that `up` names when it is ready
#   service_out  where the service's own stdout/stderr go
#   java_min     the oldest Java it runs on, for the message when there is none
#   ready_s      how long `up` waits for the first answer
#   stop_s       how long `down` waits after SIGTERM before SIGKILL
#   poll_s       how often `up` asks whether the service answers
#   free_hint    what to set when a port is taken ("KAFKA_PORT to a free port")
#   state_files  files that `down` removes besides the pid file (array, may be empty)
#   up_note      appended to the "up" line ("" or " with grpc shim"); status_note likewise
#
# and defines these functions:
#
#   prepare        everything before the start (files, config); leaves the service's command
#                  line in the array `service_cmd` and its working directory in `service_dir`
#   answers ADDR   succeeds when the service at ADDR serves clients
#   running_addr   host:port of the running service (or of the one `up` would start)
#   listen_addrs   every host:port `up` will listen on, one a line
#   show_logs      the last lines of its logs, for a failed start (to stdout)
#   after_up       (optional) what `up` does once the service answers, before its "up" line
#   installed      prints what `up` would run (the jar, the jars' folder); fails, saying how to
#                  install what is missing, when something is

die() {
  echo "$svc: $1" >&2
  exit "${2:-1}"
}

# Something accepts connections on host:port.
port_busy() {
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

# The pid recorded by `up`, if that process is still alive and still our service.
running_pid() {
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq -- "$proc_match" && echo "$pid"
}

# Seconds since $EPOCHREALTIME was $1, one decimal.
since() {
  awk "BEGIN {printf \"%.1f\", ${EPOCHREALTIME/,/.} - ${1/,/.}}"
}

# Start `service_cmd` in `service_dir`, its output in $1, detached; wait until it answers.
# setsid: its own session and process group, so it survives this shell and `down` can signal
# the whole group. The new session leader writes its own pid (= the group id) and then execs
# the command, so the recorded pid is the service itself. Sets `pid`.
launch() {
  local out="$1" deadline=$((SECONDS + ready_s))
  rm -f "$pid_file"
  nohup setsid bash -c 'cd "$0" && echo $$ >"$1" && shift && exec "$@"' \
    "$service_dir" "$pid_file" "${service_cmd[@]}" >"$out" 2>&1 </dev/null &
  until [[ -s "$pid_file" ]] || ((SECONDS >= deadline)); do sleep 0.05; done
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  pid="${pid:-0}"
  until answers "$(running_addr)"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$svc: $title exited during start. Last lines of its logs:" >&2
      show_logs >&2
      rm -f "$pid_file"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "$svc: $title did not answer on $(running_addr) within ${ready_s}s." \
           "Last lines of its logs:" >&2
      show_logs >&2
      cmd_down >/dev/null || true
      return 1
    fi
    sleep "$poll_s"  # polling interval of the readiness wait, bounded by the deadline above
  done
}

cmd_up() {
  local pid addr started
  if pid="$(running_pid)"; then
    echo "$title already running (pid $pid) on $(running_addr)."
    return 0
  fi
  for addr in $(listen_addrs); do
    if port_busy "$addr"; then
      echo "$svc: $addr is already in use by a process this script did not start." >&2
      echo "Stop it, or set $free_hint." >&2
      return 1
    fi
  done
  command -v java >/dev/null || die "java ($java_min or newer) is not installed." 2
  started="$EPOCHREALTIME"
  prepare
  launch "$service_out" || return 1
  if declare -F after_up >/dev/null; then after_up; fi
  printf '%s up on %s (pid %s) in %ss%s; log: %s\n' \
    "$title" "$(running_addr)" "$pid" "$(since "$started")" "$up_note" "$log_file"
}

cmd_down() {
  local pid addr
  if ! pid="$(running_pid)"; then
    rm -f "$pid_file" "${state_files[@]}"
    echo "$title is not running."
    return 0
  fi
  addr="$(running_addr)"
  # The pid leads its process group (setsid): signal the group so that no child survives.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + stop_s))
  while kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "$svc: no clean shutdown within ${stop_s}s; killing pid $pid." >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1  # polling interval of the shutdown wait, bounded by the deadline above
  done
  deadline=$((SECONDS + 5))
  while port_busy "$addr" && ((SECONDS < deadline)); do sleep 0.1; done
  rm -f "$pid_file" "${state_files[@]}"
  if port_busy "$addr"; then
    echo "$svc: stopped pid $pid but $addr is still in use." >&2
    return 1
  fi
  echo "$title stopped (pid $pid)."
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && answers "$(running_addr)"; then
    echo "running (pid $pid) on $(running_addr)$status_note"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "starting or unresponsive (pid $pid) on $(running_addr)"
    return 1
  fi
  echo "stopped"
  return 1
}

# Everything `up` needs is installed (the demo runs only the brokers that pass this).
cmd_installed() {
  command -v java >/dev/null || die "java ($java_min or newer) is not installed." 2
  installed
}

main() {
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    installed) cmd_installed ;;
    *)
      echo "usage: $0 up|down|status|installed" >&2
      exit 2
      ;;
  esac
}
