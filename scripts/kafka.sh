#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft: broker + controller in one JVM), no Docker.
#
#   scripts/kafka.sh up       fetch the jars once, format the storage once, start it in the
#                             background, wait until the broker answers
#   scripts/kafka.sh down     stop it (SIGTERM; SIGKILL after $KAFKA_STOP_S), wait for the port
#   scripts/kafka.sh status   print running/stopped; exit 0 when running, 1 when stopped
#   scripts/kafka.sh installed  print the jars' folder; exit 2 when they are not fetched yet
#                             and there is no Maven to fetch them
#
# The broker jars come from Maven Central through scripts/kafka/pom.xml (the Kafka version is
# set there) into a cache outside the work tree. A cold `up` with the jars cached takes 3-5 s
# on a quiet 2-core machine and 7-15 s while it trains a model (see docs/brokers.md). Topics
# and offsets live in the state dir and survive `down`/`up`; delete $FMNIST_STATE/kafka for a
# clean slate.
#
# KAFKA_SECURITY=sasl_ssl starts an authenticated, authorised broker instead (docs/brokers.md,
# "Authenticated Kafka"), with its own state folder ($FMNIST_STATE/kafka-sasl_ssl), so it never
# shares data with the plain one: its one client listener speaks SASL_SSL (SCRAM-SHA-512, TLS
# with certificates from scripts/certs); the controller listener serves only the controller
# (SASL_SSL, PLAIN, user admin); Kafka's StandardAuthorizer admits the super user `admin` and,
# through ACLs, the principals `fmnist-worker` and `fmnist-client`, nobody else. The passwords
# are generated on the first `up` into $state/secrets/<user>.password (mode 0600); after every
# `up`, admin creates the topics of the effective fmnist config and grants the ACLs
# (python -m fmnist.brokers.kafka.acls). Clients trust $state/certs/ca.pem.
#
# KAFKA_VERSION picks another release: 4.x through the same pom; 3.9.x, for clients that Kafka 4
# no longer answers (docs/brokers.md#legacy-clients), through scripts/kafka/pom-3.xml, whose
# broker logs with log4j 1 (reload4j) instead of log4j2.
#
# Environment:
#   KAFKA_VERSION     the Kafka release (default: <kafka.version> in scripts/kafka/pom.xml);
#                     3.9.x or 4.x, the releases whose KRaft is set up as below (KIP-853)
#   FMNIST_CACHE      jar cache (default ~/.cache/fmnist); uses $FMNIST_CACHE/kafka-<version>
#   FMNIST_STATE      state dir (default <repo>/.state); uses $FMNIST_STATE/kafka, or
#                     $FMNIST_STATE/kafka-<version> for a KAFKA_VERSION other than the pom's, so
#                     that releases never share data (`down` needs the same KAFKA_VERSION)
#   KAFKA_SECURITY    plaintext (default) or sasl_ssl (see above)
#   KAFKA_HOST        the address both listeners bind and clients are told (default 127.0.0.1;
#                     this machine's own address lets containers on a bridge network reach it)
#   KAFKA_PORT        client listener on $KAFKA_HOST (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller listener on $KAFKA_HOST (default 9093)
#   KAFKA_HEAP_OPTS   JVM heap (default -Xms256m -Xmx768m)
#   KAFKA_READY_S     how long `up` waits for readiness (default 60)
#   KAFKA_STOP_S      how long `down` waits after SIGTERM before SIGKILL (default 30)
#
# The pid file, `up`'s readiness wait, `down` and `status` live in scripts/lib.sh (shared with
# scripts/pubsub.sh).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"
svc=kafka.sh
java_min=17
pom="$repo/scripts/kafka/pom.xml"
default_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
version="${KAFKA_VERSION:-$default_version}"
case "$version" in
  3.9.[0-9]*) pom="$repo/scripts/kafka/pom-3.xml"; log4j=1 ;;
  [4-9].[0-9]*.[0-9]*) log4j=2 ;;
  *) die "KAFKA_VERSION=$version: only 3.9.x and 4.x start here (KRaft as set up since 3.9)." 2 ;;
esac
title="Kafka $version"
cache="${FMNIST_CACHE:-$HOME/.cache/fmnist}/kafka-$version"
libs="$cache/libs"
state="${FMNIST_STATE:-$repo/.state}/kafka"
[[ "$version" == "$default_version" ]] || state+="-$version"
security="${KAFKA_SECURITY:-plaintext}"
case "$security" in
  plaintext) ;;
  sasl_ssl) state+="-sasl_ssl"; title+=" (SASL_SSL)" ;;
  *) die "KAFKA_SECURITY=$security: plaintext or sasl_ssl." 2 ;;
esac
secrets="$state/secrets"
certs="$state/certs"
users=(admin fmnist-worker fmnist-client)
pid_file="$state/kafka.pid"
proc_match='kafka\.Kafka'
service_out="$state/kafka.out"   # the JVM's own stdout/stderr (crashes, bad flags)
log_file="$state/logs/server.log"
state_files=()
props="$state/server.properties"
host="${KAFKA_HOST:-127.0.0.1}"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-9093}"
free_hint="KAFKA_PORT / KAFKA_CONTROLLER_PORT to free ports"
ready_s="${KAFKA_READY_S:-60}"
stop_s="${KAFKA_STOP_S:-30}"
poll_s=0.2  # each readiness check starts a Python client
up_note=""
status_note=", Kafka $version"
[[ "$security" == plaintext ]] || status_note+=" (SASL_SSL)"
python="$repo/.venv/bin/python"
log_mark=1

fetch_jars() {
  local want
  want="$(sha256sum "$pom" | cut -c1-16)"  # fetch again when the pom changes
  [[ "$(cat "$libs/.complete" 2>/dev/null)" == "$want" ]] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch the Kafka $version jars." 2
  echo "Fetching the Kafka $version jars into $libs (once) ..."
  rm -rf "$libs.tmp"
  mvn -q -B -Dstyle.color=never -f "$pom" -Dkafka.version="$version" \
    dependency:copy-dependencies -DoutputDirectory="$libs.tmp" \
    || die "mvn could not fetch the jars (Maven Central reachable?)."
  rm -rf "$libs"
  mv "$libs.tmp" "$libs"
  echo "$want" >"$libs/.complete"
}

# The passwords (once, 0600), the certificates (once) and the secure listeners' settings.
write_secure_config() {
  local user admin_password
  if [[ -f "$state/data/meta.properties" && ! -s "$secrets/admin.password" ]]; then
    die "$state/data was formatted without the passwords in $secrets; delete $state to start over."
  fi
  # the whole folder is the owner's: its data holds the SCRAM credentials (salted), its
  # server.properties admin's password, secrets/ every password, certs/ the keys
  chmod 700 "$state"
  mkdir -p "$secrets"
  chmod 700 "$secrets"
  for user in "${users[@]}"; do
    [[ -s "$secrets/$user.password" ]] && continue
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secrets/$user.password")
  done
  "$repo/scripts/certs" "$certs" "$host" >/dev/null
  admin_password="$(cat "$secrets/admin.password")"
  cat >>"$props" <<EOF
# One client listener, SASL_SSL with SCRAM-SHA-512; the controller listener serves only the
# controller (PLAIN, the user admin, over TLS too). No listener admits an unauthenticated client.
listeners=SASL_SSL://$host:$port,CONTROLLER://$host:$controller_port
advertised.listeners=SASL_SSL://$host:$port
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=CONTROLLER:SASL_SSL,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$admin_password" user_admin="$admin_password";
ssl.keystore.type=PEM
ssl.keystore.location=$certs/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$certs/ca.pem
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin
allow.everyone.if.no.acl.found=false
EOF
  # admin's client settings for Kafka's own tools (--command-config), 0600 like $props
  (umask 077 && cat >"$state/admin.properties" <<EOF
# Written by scripts/kafka.sh: log in as admin, for Kafka's tools (--command-config).
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
ssl.truststore.type=PEM
ssl.truststore.location=$certs/ca.pem
EOF
  )
}

# Run the rest of the arguments as an fmnist process that is USER ($2) on the secure broker at
# $1, its password read from its file.
user_env() {
  env FMNIST_KAFKA__BOOTSTRAP_SERVERS="$1" FMNIST_KAFKA__SECURITY_PROTOCOL=SASL_SSL \
    FMNIST_KAFKA__SASL_MECHANISM=SCRAM-SHA-512 FMNIST_KAFKA__SASL_USERNAME="$2" \
    FMNIST_KAFKA__SASL_PASSWORD_FILE="$secrets/$2.password" \
    FMNIST_KAFKA__SSL_CAFILE="$certs/ca.pem" "${@:3}"
}

installed() {
  if [[ ! -f "$libs/.complete" ]]; then
    command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch the Kafka $version jars." 2
  fi
  echo "$libs"
}

write_config() {
  mkdir -p "$state/data" "$state/logs"
  (umask 077 && : >"$props")  # it holds admin's password in sasl_ssl mode
  cat >"$props" <<EOF
# Written by scripts/kafka.sh; rewritten on every \`up\`.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$host:$controller_port
controller.listener.names=CONTROLLER
EOF
  if [[ "$security" == sasl_ssl ]]; then
    write_secure_config
  else
    cat >>"$props" <<EOF
listeners=PLAINTEXT://$host:$port,CONTROLLER://$host:$controller_port
advertised.listeners=PLAINTEXT://$host:$port
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
EOF
  fi
  cat >>"$props" <<EOF
log.dirs=$state/data
num.partitions=4
# our code creates its topics itself; a typo in a topic name should fail, not create a topic
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=24
log.segment.bytes=67108864
EOF
  if ((log4j == 1)); then  # Kafka 3.x: no share groups yet; log4j 1 (reload4j)
    cat >"$state/log4j.properties" <<EOF
# Written by scripts/kafka.sh: the broker logs to $log_file (10 MB x 3).
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$log_file
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.state.change.logger=WARN
EOF
    return 0
  fi
  cat >>"$props" <<EOF
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
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
  local log_config=-Dlog4j2.configurationFile="$state/log4j2.properties"
  ((log4j == 2)) || log_config=-Dlog4j.configuration="file:$state/log4j.properties"
  jvm=(java "${heap[@]}" -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
       -Dkafka.logs.dir="$state/logs" "$log_config" -cp "$libs/*")
}

format_once() {
  [[ -f "$state/data/meta.properties" ]] && return 0
  # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding (what
  # `kafka-storage.sh random-uuid` prints); one that starts with '-' would read as a flag.
  local cluster_id=-
  while [[ "$cluster_id" == -* ]]; do
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
  done
  local scram=() user
  if [[ "$security" == sasl_ssl ]]; then  # SCRAM users exist from the first start
    for user in "${users[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$(cat "$secrets/$user.password")]")
    done
  fi
  "${jvm[@]}" kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
    --config "$props" "${scram[@]}" >"$state/format.out" 2>&1 \
    || { cat "$state/format.out" >&2; die "formatting $state/data failed."; }
}

running_addr() {
  echo "$host:$port"
}

listen_addrs() {
  printf '%s\n' "$host:$port" "$host:$controller_port"
}

# The broker answers a metadata request (it is up, unfenced and serving clients).
answers() {
  port_busy "$1" || return 1
  if [[ "$security" == sasl_ssl ]]; then  # as admin, through fmnist's own client settings
    [[ -x "$python" ]] || die "the sasl_ssl broker needs the project's venv ($python)." 2
    user_env "$1" admin "$python" - >/dev/null 2>&1 <<'EOF'
from fmnist import config
from fmnist.brokers.kafka import KafkaBroker
KafkaBroker(config.load()).check(timeout_s=2)
EOF
  elif [[ -x "$python" ]] && "$python" -c 'import confluent_kafka' 2>/dev/null; then
    "$python" - "$1" >/dev/null 2>&1 <<'EOF'
import sys
from confluent_kafka.admin import AdminClient
AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0}).list_topics(timeout=2)
EOF
  else  # no client library at hand: trust the broker's own "started" line of this run
    [[ -n "$(tail -n +"$log_mark" "$log_file" 2>/dev/null | grep -m1 'Kafka Server started')" ]]
  fi
}

# The JVM's own output, then the last lines this run wrote to the broker's log (earlier runs'
# lines would mislead).
show_logs() {
  echo "--- $service_out"
  tail -n 15 "$service_out" 2>/dev/null || true
  echo "--- $log_file"
  tail -n +"$log_mark" "$log_file" 2>/dev/null | tail -n 30 || true
}

prepare() {
  fetch_jars
  write_config
  set_jvm
  format_once
  log_mark=$(( $(cat "$log_file" 2>/dev/null | wc -l) + 1 ))  # this run's lines start here
  service_cmd=("${jvm[@]}" kafka.Kafka "$props")
  service_dir="$state"
}

# After `up` in sasl_ssl mode: admin creates the topics of the effective fmnist config and grants
# the ACLs of fmnist-worker and fmnist-client on them (idempotent).
after_up() {
  [[ "$security" == sasl_ssl ]] || return 0
  user_env "$(running_addr)" admin "$python" -m fmnist.brokers.kafka.acls \
    --worker fmnist-worker --client fmnist-client >"$state/acls.txt" \
    || die "granting the ACLs failed (the broker is up: \`scripts/kafka.sh down\` stops it)."
  up_note=" with $(grep -c '^granted' "$state/acls.txt") ACLs ($state/acls.txt); passwords in"
  up_note+=" $secrets, CA $certs/ca.pem"
}

main "$@"
