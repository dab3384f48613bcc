"""Errors of the wire contract.

A message that fails validation is a value with a reason (it goes to the dead-letter stream with
that reason), never a traceback from deep inside a role's loop. So every failure names the field.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message could not be decoded or failed validation; `field` names what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InputError(ValueError):
    """What the user brings does not fit: a prompt file's line, a setting the model cannot honour.

    Raised before any work starts, naming the file and line or the config key; the CLI exits 2 with the
    message, as for an invalid config, instead of a traceback.
    """
