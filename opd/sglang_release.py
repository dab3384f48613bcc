"""The SGLang release this project's SGLang clients are written and checked against.

WHY one constant: SGLang validates request bodies against its own schema and rejects unknown
sampling keys, so a server from another release can turn every rollout batch into HTTP 400 (issue
18). The compose image tag (docker-compose.yml, deploy/opd.env.example) and the GPU smoke check
(scripts/gpu-smoke.sh warns when the separate SGLang interpreter has another version) follow this
value; tests/unit/test_compose_gpu.py fails when they drift apart.
"""

from __future__ import annotations

SGLANG_VERSION = "0.5.23"
# lmsysorg/sglang tags releases `v<version>` (CUDA 13 builds since 0.5.20; `v0.5.19-cu129` was the
# last CUDA 12 tag, per SGLang's install docs).
SGLANG_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
