"""The SGLang release this project's HTTP clients are written and contract-tested against.

One place for the version: `tests/unit/test_sglang_contract.py` downloads exactly this wheel (without
dependencies, never installed) and validates every request body we build against the schema inside
it, and a compose file or script that pins an SGLang image or interpreter can read it from here
(`python -c "from protocol.sglang_version import SGLANG_VERSION; print(SGLANG_VERSION)"`). Moving to
a newer SGLang is: change these three values, run the contract test, fix what it names.

Why a pin at all: SGLang's `/generate` schema rejects unknown sampling keys with HTTP 400 and renames
fields between releases, so an unpinned server can turn every batch into an error.
"""

from __future__ import annotations

SGLANG_VERSION = "0.5.23"
# The wheel the contract test reads. SGLang ships only CPython- and platform-tagged wheels, but the
# schema files inside are plain Python, so one fixed file serves every host the test runs on.
SGLANG_WHEEL = "sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl"
SGLANG_WHEEL_SHA256 = "00b3cd5b265ac76c64185fbb6b95424f324ddd9f428d0306b77bc9db9d859937"
