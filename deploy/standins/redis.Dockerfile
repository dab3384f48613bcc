# Stand-in for redis:7 where no container registry answers: Debian bookworm's redis-server (7.0)
# and redis-cli on a debootstrap'ed minbase image (scripts/setup-docker.sh standins builds it).
# Like the real image: data in /data (the working directory), `redis-server` on PATH.
ARG BASE=opd-standin/debian:bookworm-minbase
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /data
WORKDIR /data
EXPOSE 6379
LABEL org.opd.standin="redis:7 from Debian bookworm packages"
CMD ["redis-server", "--protected-mode", "no"]
