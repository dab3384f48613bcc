# Stand-in for prom/prometheus where no container registry answers: Debian bookworm's prometheus
# (2.42) and wget (the compose healthcheck's probe) on a debootstrap'ed minbase image
# (scripts/setup-docker.sh standins builds it). Like the real image: the entrypoint is the server,
# the arguments are flags, data in /prometheus.
ARG BASE=opd-standin/debian:bookworm-minbase
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /prometheus
WORKDIR /prometheus
EXPOSE 9090
LABEL org.opd.standin="prom/prometheus from Debian bookworm packages"
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
