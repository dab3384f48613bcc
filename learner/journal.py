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
step is done, one server-side script checks that every entry of the batch is still pending for this
consumer, then copies its payload into the journal (tagged with the step and the resulting policy
version), acknowledges and deletes it from ``opd:scored``, and records its id ``trained`` in the ledger.
The ledger record is inside the script, after every check, not queued beside it in a ``MULTI``: an error
reply does not abort a ``MULTI``, so a refused commit would still have marked its batch trained, and the
restarted learner would then have deleted the untrained entries as copies (issue 16).
After a checkpoint is durably written (and, with several ranks, every rank passed a barrier), the journal
entries of the steps it contains are deleted. After a crash the learner loads the newest checkpoint and
replays the journaled steps after it, in order, with the same batches: a checkpoint plus its journal is
the state at the last committed step (bit-identical on CPU, since the RNG and optimizer state are
restored), so no acknowledged sample is lost and none is applied twice. Samples read but not committed
are still pending in the consumer group and are re-delivered (see ``learner/inflight.py``).

Cost: the journal holds the payloads of at most ``checkpoint_every`` steps, so Redis memory grows by
``checkpoint_every x batch_size x message size`` (what deferring the acknowledgement would have held too).

At most once, also against copies: a second stream entry carrying an id already trained or in flight
(a publish retried after a lost reply, a copy a slow teacher forwarded) is refused before it is trained,
by `StepJournal.refuse_duplicates`: one script checks the ledger (``trained``), the in-flight holder of
the id (``ledger.keys``' holders hash, cleared when the id is terminal), and, for the case where Redis
lost the last second of writes in a crash (AOF ``everysec``), the ids this process itself committed. A
refused copy is acknowledged and deleted, and counted in ``<ns>:count:duplicates`` and
``opd_learner_duplicates_total``; its id keeps its one outcome.

A commit retried after a lost reply (``protocol/reconnect.py`` retries calls while Redis is down) finds
its step already at the journal's tail and returns it instead of failing: the first attempt went through.

Crash windows, each safe: before the script (nothing acknowledged; the batch is re-delivered), after it
(journaled; replayed; a lineage row the crash kept from being written is written by the replay), after a checkpoint but before its journal entries are deleted (replay skips steps
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

# KEYS: scored stream, journal, then the ledger's keys (`ledger.keys`: ledger, outcomes, holders).
# ARGV: group, consumer, step, version, payload field, the `trained` outcome, then per entry: entry id, message id.
# Returns the journal entry ids written. Failure replies (nothing written, in either stream or the ledger):
#   NOTOWNED  an entry is no longer pending for this consumer (another consumer claimed it, or it was settled);
#   MISSING   an entry is pending but was deleted from the stream;
#   NOPAYLOAD an entry carries no payload field.
# Every check runs before the first write, and the ledger's `trained` is recorded here, after them, not in a
# MULTI beside the script: an error reply does not abort a MULTI (STYLE.md item 14), so a ledger update queued
# with a refused commit would mark untrained work trained. A step already at the journal's tail was committed
# by an earlier attempt whose reply was lost: its journal ids are returned and nothing is written.
_COMMIT = ledger.LUA_RECORD + """
local stream, journal = KEYS[1], KEYS[2]
local lk = {KEYS[3], KEYS[4], KEYS[5]}
local group, consumer, step, version = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local payload, trained = ARGV[5], ARGV[6]
local first, n = 7, math.floor((#ARGV - 6) / 2)
local function step_of(entry)
  local f = entry[2]
  for j = 1, #f, 2 do if f[j] == 'step' then return f[j + 1] end end
end
local tail = redis.call('XREVRANGE', journal, '+', '-', 'COUNT', math.max(n, 1))
if #tail > 0 and step_of(tail[1]) == step then
  local done = {}
  for i = #tail, 1, -1 do if step_of(tail[i]) == step then done[#done + 1] = tail[i][1] end end
  return done
end
local blobs = {}
for i = first, #ARGV, 2 do
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
if n == 0 then
  out[1] = redis.call('XADD', journal, '*', 'step', step, 'version', version, 'entry', '')
  return out
end
for k = 1, n do
  local id, mid = ARGV[first + 2 * (k - 1)], ARGV[first + 2 * (k - 1) + 1]
  out[k] = redis.call('XADD', journal, '*', 'step', step, 'version', version, 'entry', id, payload, blobs[k])
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
  ledger_record(lk, mid, trained)
end
return out
"""


# KEYS: scored stream, ledger, outcomes, holders, duplicates counter.
# ARGV: group, consumer, the `trained` outcome, then per delivery: entry id, message id, known ('1': this
# process committed the id). Per delivery returns 1 (admitted: this entry now holds the id) or 0 (a copy:
# acknowledged, deleted and counted if still this consumer's; a known id is recorded trained again, in
# case Redis lost that record).
_ADMIT = ledger.LUA_RECORD + """
local stream = KEYS[1]
local lk = {KEYS[2], KEYS[3], KEYS[4]}
local group, consumer, trained = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 3 do
  local eid, mid, known = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local dup = known == '1' or redis.call('HGET', lk[1], mid) == trained
  if not dup then
    local holder = redis.call('HGET', lk[3], mid)
    dup = holder and holder ~= eid and #redis.call('XRANGE', stream, holder, holder) > 0
  end
  if dup then
    if #redis.call('XPENDING', stream, group, eid, eid, 1, consumer) > 0 then
      redis.call('XACK', stream, group, eid)
      redis.call('XDEL', stream, eid)
      redis.call('INCR', KEYS[5])
    end
    if known == '1' then ledger_record(lk, mid, trained) end
    out[#out + 1] = 0
  else
    redis.call('HSET', lk[3], mid, eid)
    out[#out + 1] = 1
  end
end
return out
"""

_REMEMBER = 200_000  # ids this process committed, kept to refuse copies even if Redis lost their record


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
        self._ids: list[tuple[int, str]] = []  # (step, journal entry id), oldest first
        self._trained: dict[str, None] = {}  # message ids this process committed (or replayed), oldest first

    def commit(self, step: int, version: int, batch: list[Delivery[ScoredPrefix]]) -> None:
        """Journal the batch of ``step``, acknowledge it and record it ``trained``, in one script (all or nothing).

        An empty batch (a rank without a share of this step) journals a marker, so every rank's journal
        lists every step and a gap always means corruption. Raises `CommitError` when an entry is no
        longer this consumer's (or is gone): then nothing was journaled, acknowledged or recorded, the ledger
        still says ``produced``, and the caller must stop; the entries this consumer still holds are taken
        back at its restart, and the consumer that took the others over trains those.
        """
        args: list[str | int] = [self.group, self.consumer, step, version, PAYLOAD, ledger.TRAINED]
        for d in batch:
            args += [d.entry_id, d.message.id]
        # EVAL, not a registered script: a retry against a restarted Redis (empty script cache) would fail
        # with NOSCRIPT.
        try:
            journal_ids = self.client.eval(_COMMIT, 5, self.stream, self.key, *ledger.keys(self.names), *args)
        except redis.ResponseError as exc:
            raise CommitError(f"step {step}: could not commit its batch: {exc}") from exc
        self._ids += [(step, _s(j)) for j in journal_ids]
        self._remember([d.message.id for d in batch])

    def refuse_duplicates(self, deliveries: list[Delivery[ScoredPrefix]]) -> tuple[list[Delivery[ScoredPrefix]], list[Delivery[ScoredPrefix]]]:
        """``(admitted, refused)``: refuse copies of ids already trained or held by another entry (see module doc).

        Called on every delivery before it can reach a batch, in one round trip per read.
        """
        if not deliveries:
            return [], []
        args: list[str] = [self.group, self.consumer, ledger.TRAINED]
        for d in deliveries:
            mid = d.message.id
            args += [d.entry_id, mid, "1" if mid in self._trained else "0"]
        results = self.client.eval(_ADMIT, 5, self.stream, *ledger.keys(self.names), ledger.duplicates_key(self.names),
                                   *args)
        admitted = [d for d, r in zip(deliveries, results, strict=True) if r == 1]
        refused = [d for d, r in zip(deliveries, results, strict=True) if r != 1]
        if refused:
            log.warning("%s: refused %d copies of prefixes already trained or in flight: %s", self.consumer,
                        len(refused), [d.message.id for d in refused][:4])
        return admitted, refused

    def _remember(self, message_ids: list[str]) -> None:
        for mid in message_ids:
            self._trained[mid] = None
        while len(self._trained) > _REMEMBER:
            del self._trained[next(iter(self._trained))]

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
                    js.messages.append(message)
                    self._remember([message.id])
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

    def intact(self) -> bool:
        """Whether Redis still holds every entry this rank journaled since its checkpoint.

        False after Redis came back from a crash without its last writes (AOF ``everysec`` loses up to
        about a second on power loss): the lost steps are in this process's weights but no longer in the
        journal, so a restart could not replay them; the caller checkpoints at once (docs/reliability.md).
        """
        return int(self.client.xlen(self.key)) >= len(self._ids)

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
