# One image for every pipeline role (`opd actor|teacher|learner`); docker-compose.yml builds it once
# per role service from this file.
#
# Torch comes from the index in TORCH_INDEX_URL. The default is the CPU wheel index (a ~200 MB torch
# instead of PyPI's CUDA build of several GB): actors and teachers that talk to SGLang servers need
# no GPU. For a learner on a GPU, build with a CUDA index, e.g.
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# (or set TORCH_INDEX_URL in .env; see docs/deploy.md).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Torch first, in its own layer: it is by far the largest dependency and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# Then the project itself (its remaining dependencies come from PyPI; torch is already satisfied).
COPY . /app
RUN pip install /app \
    && opd --help > /dev/null

# Run as an unprivileged user. The shared volumes' mount points are created here and chowned at
# start by compose's `init-volumes` service, whichever image first creates each volume.
RUN useradd --create-home --uid 10001 opd \
    && mkdir -p /data/learner /data/cache \
    && chown -R opd:opd /data
USER opd

EXPOSE 9400
CMD ["opd", "--help"]
