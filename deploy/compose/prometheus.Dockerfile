# Prometheus from Debian's package, for hosts that cannot pull prom/prometheus (its entrypoint
# and paths match the official image's, so docker-compose.yml runs either):
#   docker build -f deploy/compose/prometheus.Dockerfile -t fmnist-prometheus:debian deploy/compose
#   PROMETHEUS_IMAGE=fmnist-prometheus:debian docker compose up -d
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]   # /bin is /usr/bin on Debian
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
