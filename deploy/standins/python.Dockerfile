# Stand-in for python:3.11-slim where no container registry answers: Debian bookworm's Python 3.11
# (3.11.2) on a debootstrap'ed minbase image (scripts/setup-docker.sh standins builds it).
# `python` on PATH as in the real image; pip trusts the host's CA bundle (copied into the build
# context as ca-certificates.crt), through which containers reach the package registries.
ARG BASE=opd-standin/debian:bookworm-minbase
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && ln -s /usr/bin/python3 /usr/local/bin/python
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV LANG=C.UTF-8 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opd.standin="python:3.11-slim from Debian bookworm packages"
CMD ["python3"]
