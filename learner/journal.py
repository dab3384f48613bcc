"""The step journal: why an acknowledged sample survives a learner crash, and how it is replayed.

The problem: a sample is acknowledged (``XACK`` + ``XDEL`` on ``opd:scored``) once an optimizer step has
used it, but that step lives only in the learner's memory until the next checkpoint. A ``SIGKILL`` in
between would lose the effect of every sample acknowledged since the checkpoint.

Why not simply defer the acknowledgement to the checkpoint: held entries would stay in ``opd:scored``, whose
length is what the teachers' back-pressure compares with ``transport.high_water`` (``checkpoint_every x
batch_size`` held entries can exceed it and stall the teachers, hence the learner); and the actors'
admission control counts retired (ledger-terminal) samples, so withholding the ``trained`` outcome until a
checkpoint would starve the actors. Checkpoints of a real student are also far too expensive to take every
few steps to keep those windows small.

So the learner keeps a write-ahead log, a Redis stream per rank (``<ns>:learner:journal:<rank>``). When a
step is done, one server-side script, in the same ``MULTI`` as the ``trained`` ledger outcome, checks that
every entry of the batch is still pending for this consumer, copies its payload into the journal (tagged
with the step and the resulting policy version), and acknowledges and deletes it from ``opd:scored``.
After a checkpoint is durably written (and, with several ranks, every rank passed a barrier), the journal
entries of the steps it contains are deleted. After a crash the learner loads the newest checkpoint and
replays the journaled steps after it, in order, with the same batches: a checkpoint plus its journal is
the state at the last committed step (bit-identical on CPU, since the RNG and optimizer state are
restored), so no acknowledged sample is lost and none is applied twice. Samples read but not committed
are still pending in the consumer group and are re-delivered (see ``learner/inflight.py``).

Cost: the journal holds the payloads of at most ``checkpoint_every`` steps, so Redis memory grows by
``checkpoint_every x batch_size x message size`` (what deferring the acknowledgement would have held too).

Crash windows, each safe: before the ``MULTI`` (nothing acknowledged; the batch is re-delivered), after it
(journaled; replayed), after a checkpoint but before its journal entries are deleted (replay skips steps
the checkpoint already contains, by step number). With several ranks a crash can land between two ranks'
commits of the same step: the step is replayed with the missing rank's share empty, and that share is
still pending, so it is trained again later, exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from protocol import ledger
from protocol.messages import ScoredPrefix, decode
from protocol.names import Names
from protocol.streams import PAYLOAD, Delivery

log = logging.getLogger(__name__)

# KEYS: scored stream, journal. ARGV: group, consumer, step, version, entry ids...
# Checks everything before writing anything, so a failed commit leaves both streams untouched.
_COMMIT = """
local stream, journal = KEYS[1], KEYS[2]
local group, consumer, step, version = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local payload = ARGV[5]
local blobs = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  if #redis.call('XPENDING', stream, group, id, id, 1, consumer) == 0 then
    return redis.error_reply('NOTOWNED entry ' .. id .. ' is no longer pending for consumer ' .. consumer)
  end
  local entry = redis.call('XRANGE', stream, id, id)
  if #entry == 0 then return redis.error_reply('MISSING entry ' .. id .. ' was deleted') end
  local fields, blob = entry[1][2], nil
  for j = 1, #fields, 2 do if fields[j] == payload then blob = fields[j + 1] end end
  if not blob then return redis.error_reply('NOPAYLOAD entry ' .. id) end
  blobs[#blobs + 1] = blob
end
local out = {}
if #blobs == 0 then
  out[1] = redis.call('XADD', journal, '*', 'step', step, 'version', version, 'entry', '')
  return out
end
for i = 6, #ARGV do
  out[#out + 1] = redis.call('XADD', journal, '*', 'step', step, 'version', version, 'entry', ARGV[i],
                             payload, blobs[i - 5])
  redis.call('XACK', stream, group, ARGV[i])
  redis.call('XDEL', stream, ARGV[i])
end
return out
"""


class CommitError(RuntimeError):
    """A batch could not be committed: an entry was taken over by another consumer, or deleted."""


@dataclass
class JournalStep:
    """One optimizer step as journaled by this rank (``messages`` empty: this rank had no share)."""

    step: int
    version: int
    messages: list[ScoredPrefix] = field(default_factory=list)


class StepJournal:
    """This rank's write-ahead log of committed steps (see the module docstring)."""

    def __init__(self, client: redis.Redis, names: Names, *, stream: str, group: str, consumer: str, rank: int,
                 max_bytes: int) -> None:
        self.client = client
        self.names = names
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.key = names.key(f"learner:journal:{rank}")
        self.max_bytes = max_bytes
        self._commit = client.register_script(_COMMIT)
        self._ids: list[tuple[int, str]] = []  # (step, journal entry id), oldest first

    def commit(self, step: int, version: int, batch: list[Delivery]) -> None:
        """Journal the batch of ``step``, acknowledge it and record it ``trained``, atomically.

        An empty batch (a rank without a share of this step) journals a marker, so every rank's journal
        lists every step and a gap always means corruption. Raises `CommitError` when an entry is no
        longer this consumer's: then nothing was acknowledged or journaled and the caller must stop (the
        consumer that took the entries over trains them; the ledger's ``trained`` for them, queued in the
        same ``MULTI``, becomes true when it does).
        """
        pipe = self.client.pipeline(transaction=True)
        self._commit(keys=[self.stream, self.key],
                     args=[self.group, self.consumer, step, version, PAYLOAD, *[d.entry_id for d in batch]],
                     client=pipe)
        if batch:
            ledger.record(pipe, self.names, {d.message.id: ledger.TRAINED for d in batch})  # type: ignore[union-attr]
        try:
            journal_ids = pipe.execute()[0]
        except redis.ResponseError as exc:
            raise CommitError(f"step {step}: could not commit its batch: {exc}") from exc
        self._ids += [(step, _s(j)) for j in journal_ids]

    def load(self, after_step: int) -> list[JournalStep]:
        """The journaled steps after ``after_step`` (the checkpoint's), oldest first; older ones are deleted.

        Raises ValueError if the steps after the checkpoint are not consecutive from ``after_step + 1``:
        the journal and the checkpoint directory then belong to different runs, and replaying would train
        on the wrong state.
        """
        steps: dict[int, JournalStep] = {}
        stale: list[str] = []
        self._ids = []
        last = "-"
        while True:
            entries = self.client.xrange(self.key, min=last if last == "-" else f"({last}", count=256)
            if not entries:
                break
            for jid, fields in entries:
                jid_s = _s(jid)
                last = jid_s
                step = int(fields[b"step"])
                if step <= after_step:
                    stale.append(jid_s)
                    continue
                self._ids.append((step, jid_s))
                js = steps.setdefault(step, JournalStep(step=step, version=int(fields[b"version"])))
                blob = fields.get(PAYLOAD)
                if blob is not None:
                    message = decode(blob, max_bytes=self.max_bytes, expect=ScoredPrefix)
                    js.messages.append(message)  # type: ignore[arg-type]
        if stale:
            self._delete(stale)
        ordered = [steps[s] for s in sorted(steps)]
        expected = list(range(after_step + 1, after_step + 1 + len(ordered)))
        if [js.step for js in ordered] != expected:
            raise ValueError(
                f"{self.key} holds steps {[js.step for js in ordered][:8]} but the checkpoint is at step {after_step}: "
                "the learner's work dir and this Redis namespace belong to different runs (use a fresh "
                "transport.namespace, or delete the journal key to discard those steps)")
        return ordered

    def forget_through(self, step: int) -> None:
        """Delete the journal entries of steps <= ``step``: a durable checkpoint now contains them."""
        done = [jid for s, jid in self._ids if s <= step]
        self._ids = [(s, jid) for s, jid in self._ids if s > step]
        if done:
            self._delete(done)

    def __len__(self) -> int:
        return len(self._ids)

    def _delete(self, ids: list[str]) -> None:
        for i in range(0, len(ids), 1000):
            self.client.xdel(self.key, *ids[i:i + 1000])


def orphaned_journals(client: redis.Redis, names: Names, world_size: int) -> dict[int, int]:
    """``rank -> entries`` of non-empty journals of ranks this run does not have (``rank >= world_size``).

    Why: their steps were acknowledged; only the rank that wrote them can replay them, so a restart with
    fewer ranks than the run that crashed would lose them.
    """
    prefix = names.key("learner:journal:")
    out: dict[int, int] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=100):
        suffix = _s(key)[len(prefix):]
        if suffix.isdigit() and int(suffix) >= world_size and (n := int(client.xlen(key))) > 0:
            out[int(suffix)] = n
    return out


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
