# One image for every pipeline role (`opd actor|teacher|learner`); docker-compose.yml builds it twice,
# CPU torch for the actors and teachers (opd:local), CUDA torch for the GPU learner (opd:local-cuda).
#
# Torch comes from the index in TORCH_INDEX_URL. The default is the CPU wheel index (a ~200 MB torch
# instead of PyPI's CUDA build of several GB): actors and teachers that talk to SGLang servers need
# no GPU. The GPU learner's image is this Dockerfile built with a CUDA wheel index instead:
# docker-compose.yml builds its `learner` service as opd:local-cuda with
#   TORCH_INDEX_URL=${TORCH_CUDA_INDEX_URL:-https://download.pytorch.org/whl/cu128}
# (by hand: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t opd:local-cuda .;
# docs/deploy.md, "GPU layouts").
#
# Air-gapped clusters: put a torch wheel (cp311, for the image's platform) in deploy/wheels/ (or the
# folder named by the WHEELS build arg, inside the build context) and torch is installed from there,
# with no request to TORCH_INDEX_URL. Other wheels there are preferred too; with every dependency
# there (`pip download -d deploy/wheels ...`), build with `--build-arg PIP_NO_INDEX=1` and no index is
# asked at all. The wheels stay in the first stage: the final image holds only the installed venv.
# Builds with BuildKit and with the legacy builder (no RUN --mount).
FROM python:3.11-slim AS deps

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4"
ARG WHEELS=deploy/wheels
# pip reads it from the environment: 1 = never ask an index (every wheel must be in WHEELS).
ARG PIP_NO_INDEX=0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/opd/bin:$PATH

RUN python -m venv /opt/opd

# Torch first, in its own layer: it is by far the largest dependency and changes least often.
COPY ${WHEELS}/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
        echo "torch from the wheel folder: $(ls /tmp/wheels/torch-*.whl)" \
        && pip install --no-index --no-deps --find-links /tmp/wheels "${TORCH_SPEC}" \
        && pip install --find-links /tmp/wheels "${TORCH_SPEC}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
    fi

# Then the project's other dependencies, from pyproject.toml alone (no code yet, so this layer is
# kept while only the code changes), and the build backend the final stage installs the code with.
COPY pyproject.toml README.md /src/
RUN pip install --find-links /tmp/wheels "setuptools>=68" /src && pip uninstall -y opd


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/opd/bin:$PATH
LABEL org.opd.image="roles"

COPY --from=deps /opt/opd /opt/opd

# Run as an unprivileged user. The shared volumes' mount points are created here and chowned at
# start by compose's `init-volumes` service, whichever image first creates each volume.
RUN useradd --create-home --uid 10001 opd \
    && mkdir -p /data/learner /data/cache /data/assets \
    && chown -R opd:opd /data

# The code last: a change to it rebuilds only these small layers (no index asked: the build backend
# is in the venv).
COPY pyproject.toml README.md /src/
COPY protocol /src/protocol
COPY actors /src/actors
COPY cache /src/cache
COPY learner /src/learner
COPY opd /src/opd
RUN pip install --no-deps --no-build-isolation /src \
    && rm -rf /src/build /src/*.egg-info \
    && opd --help > /dev/null
COPY configs /app/configs
WORKDIR /app
USER opd

EXPOSE 9400
CMD ["opd", "--help"]
