"""Codec benchmark: encode + decode of a realistic scored prefix, against `json` and against a raw copy.

    python bench/bench_codec.py                  # 2048 response tokens, top-k 32, float32 and float16 top-k
    python bench/bench_codec.py --quick          # tiny message, one short round (smoke test)

WHY: every prefix crosses the codec twice per hop (the actor encodes, the teacher decodes and encodes
its scored prefix, the learner decodes), so its cost per message bounds the per-process message rate.
Measured in the same run, on the same message (`bench.common.scored_prefix`: realistic top-k ids from
a 152k vocabulary, descending logprobs, as the teacher forwards them):

- opd: `protocol.messages.encode` / `decode`, the real path (schema checks and `validate()` included);
- json: the same content with arrays as lists (`tolist` + `json.dumps`; `json.loads` + `np.asarray`
  back to arrays of the same dtypes): the obvious alternative a codec must beat;
- raw copy (the ceiling): the arrays' bytes copied into one buffer, and that buffer copied once more
  and viewed as arrays: two memcpys of the payload, the least any encode + decode through a byte
  buffer can do.

Rates are messages per second, best of `--rounds` rounds of at least `--min-s` seconds each; MB/s is
messages/s times the opd-encoded size, so every row moves the same content. encode+decode is
1 / (1/encode + 1/decode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt, print_table, rate, ratio, scored_prefix
from protocol.messages import ScoredPrefix, decode, encode

Codec = tuple[Callable[[ScoredPrefix], Any], Callable[[Any], Any]]


@dataclass
class Row:
    dtype: str
    name: str
    size: int
    encode_ps: float
    decode_ps: float

    @property
    def both_ps(self) -> float:
        return 1.0 / (1.0 / self.encode_ps + 1.0 / self.decode_ps)


def _array_names(msg: ScoredPrefix) -> list[str]:
    return list(type(msg).arrays)


def json_codec(msg: ScoredPrefix) -> Codec:
    """The same content as JSON: arrays as lists, decoded back to numpy arrays of their dtypes."""
    arrays = {n: getattr(msg, n).dtype for n in _array_names(msg)}

    def enc(m: ScoredPrefix) -> bytes:
        doc = {f.name: getattr(m, f.name) for f in fields(m)}
        for n in arrays:
            doc[n] = doc[n].tolist()
        return json.dumps(doc).encode()

    def dec(blob: bytes) -> dict[str, Any]:
        doc = json.loads(blob)
        for n, dtype in arrays.items():
            doc[n] = np.asarray(doc[n], dtype=dtype)
        return doc

    return enc, dec


def raw_codec(msg: ScoredPrefix) -> Codec:
    """The ceiling: the arrays' bytes copied into one buffer, then that buffer copied and viewed as arrays."""
    layout = [(n, getattr(msg, n).dtype, getattr(msg, n).shape, getattr(msg, n).nbytes) for n in _array_names(msg)]
    total = sum(nb for *_, nb in layout)

    def enc(m: ScoredPrefix) -> np.ndarray:
        buf = np.empty(total, np.uint8)
        off = 0
        for n, _dt, _sh, nb in layout:
            buf[off : off + nb] = np.ascontiguousarray(getattr(m, n)).reshape(-1).view(np.uint8)
            off += nb
        return buf

    def dec(buf: np.ndarray) -> dict[str, np.ndarray]:
        data = buf.copy()
        out, off = {}, 0
        for n, dt, sh, nb in layout:
            out[n] = data[off : off + nb].view(dt).reshape(sh)
            off += nb
        return out

    return enc, dec


def opd_codec(_msg: ScoredPrefix) -> Codec:
    return (lambda m: encode(m)), (lambda blob: decode(blob, expect=ScoredPrefix))


def check_roundtrip(msg: ScoredPrefix, name: str, codec: Codec) -> None:
    """Refuse to time a codec that does not give the same arrays back."""
    back = codec[1](codec[0](msg))
    for n in _array_names(msg):
        got = getattr(back, n) if isinstance(back, ScoredPrefix) else back[n]
        ref = getattr(msg, n)
        if got.dtype != ref.dtype or not np.array_equal(got, ref):
            raise SystemExit(f"bench: {name} does not round-trip {n}")


def bench_dtype(dtype: str, args: argparse.Namespace) -> list[Row]:
    msg = scored_prefix(np.random.default_rng(0), prompt=args.prompt, response=args.response, k=args.k,
                        vocab=args.vocab, topk_dtype=dtype)
    rows = []
    for name, make in (("raw copy (ceiling)", raw_codec), ("opd msgpack", opd_codec), ("json", json_codec)):
        codec = make(msg)
        check_roundtrip(msg, name, codec)
        blob = codec[0](msg)
        size = blob.nbytes if isinstance(blob, np.ndarray) else len(blob)
        enc_ps = rate(lambda c=codec: c[0](msg), min_s=args.min_s, repeat=args.rounds)
        dec_ps = rate(lambda c=codec, b=blob: c[1](b), min_s=args.min_s, repeat=args.rounds)
        rows.append(Row(dtype, name, size, enc_ps, dec_ps))
        print(f"[bench] {dtype} {name} done", file=sys.stderr)
    return rows


def print_report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\ncodec benchmark: ScoredPrefix, prompt {args.prompt} + response {args.response} tokens, top-k {args.k}, "
          f"vocab {args.vocab}; best of {args.rounds} rounds >= {args.min_s}s on {os.cpu_count()} CPUs")
    print("messages/s; MB/s = messages/s x opd-encoded size; ratios of encode+decode rates")
    head = ["top-k dtype", "codec", "encoded size", "encode msg/s", "decode msg/s", "enc+dec msg/s", "enc+dec MB/s",
            "opd vs this", "this vs raw copy"]
    table = []
    for r in rows:
        opd = next(x for x in rows if x.dtype == r.dtype and x.name == "opd msgpack")
        raw = next(x for x in rows if x.dtype == r.dtype and x.name.startswith("raw"))
        table.append([r.dtype, r.name, fmt(r.size, "B"), fmt(r.encode_ps), fmt(r.decode_ps), fmt(r.both_ps),
                      fmt(r.both_ps * opd.size / 1e6), ratio(opd.both_ps, r.both_ps, 2), ratio(r.both_ps, raw.both_ps, 3)])
    print_table(head, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--response", type=int, default=2048, help="response tokens (scored)")
    p.add_argument("--k", type=int, default=32, help="top-k")
    p.add_argument("--vocab", type=int, default=152_064, help="vocabulary the top-k ids are drawn from")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"],
                   help="top-k logprob dtypes (teacher.topk_dtype; float32 is the default)")
    p.add_argument("--min-s", type=float, default=0.5, help="seconds per timing round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (best kept)")
    p.add_argument("--quick", action="store_true", help="a tiny message and one short round (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.response, args.min_s, args.rounds = 8, 16, 0.01, 1
    rows = [r for dtype in args.dtypes for r in bench_dtype(dtype, args)]
    print_report(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
