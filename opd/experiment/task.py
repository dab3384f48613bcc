"""The experiment's task: decimal to binary by repeated halving, written out line by line.

WHY this task. Truncated on-policy distillation only matters when answers are long enough that
generating them dominates a training step (hundreds of tokens), and the experiment needs a quality
signal a user believes: exact-match accuracy of complete greedy answers, not only a KL. The task also
has to be learnable to high accuracy by a ~1M-parameter model in minutes on a CPU, so every token of
the trace is a function of a few tokens at fixed distances (the same column of the previous line, its
neighbour, the token just written): small transformers learn such rules fast and exactly, whereas
operations whose carries run against the writing direction (MSB-first addition) or that look things
up by a running index (the i-th digit of the prompt) take far longer. For the same reason the prompt
ends with the trace's first line (the number right-aligned): copying a variable-length number into
aligned columns was, in a first try, the one rule a 1M-parameter model had not learned after 300 steps.

The algorithm: halve the number, note the remainder; repeat until the number is 0. The remainders,
newest first, are the binary digits. Each line holds the quotient (right-aligned in ``Q_WIDTH``
columns, blank columns written ``.``) and a shift register of the bits found so far (the new bit
enters on the left, older bits move one column right, unused columns are ``.``). The prompt asks for
the number and gives the first line; the answer's last line is the one whose quotient is 0 (all
``.``) and its register is the answer. For 13::

    binary of 13:          <- prompt: the question and the first line, each ending with a newline
    ...13 ................
    ....6 1...............  <- the answer starts here
    ....3 01..............
    ....1 101.............
    ..... 1101............ <- then EOS (no newline after the last line)

Numbers are drawn with a bit length uniform in ``[MIN_BITS, MAX_BITS]``, so an answer has
``bits`` lines of ``LINE_CHARS`` characters: 138 to 368 tokens with EOS (one token per character).
Every column rule is local: quotient digit i of a line depends on digits i and i-1 of the line above;
the new bit on the last quotient digit above; register column j on column j-1 above; EOS on whether
the quotient's last column just written is ``.``.

Tokenizer convention: one token per character, ``<eos>`` ends an answer, ``<pad>`` pads, and there is
NO BOS token: the tokenizer defines none and adds no special tokens, so ``encode(text)`` with or
without ``add_special_tokens`` gives the same ids, and every loader (actors, cache warm, held-out
evaluation) encodes a prompt exactly as the models were trained on it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

Q_WIDTH = 5  # quotient columns: numbers below 10**5
BITS_WIDTH = 16  # register columns: up to 16-bit numbers
MIN_BITS, MAX_BITS = 6, 16  # bit lengths drawn (uniformly): 32 <= n < 65536
BLANK = "."
LINE_CHARS = Q_WIDTH + 1 + BITS_WIDTH + 1  # quotient, space, register, newline
PROMPT_PREFIX = "binary of "

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
ALPHABET: str = "0123456789 .:\nabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    """One task instance: `prompt` is what the student sees, `answer` the full reference trace."""

    n: int
    prompt: str
    answer: str  # the whole trace, no EOS
    target: str  # the final answer: n in binary, e.g. "1101"


def prompt_for(n: int) -> str:
    """The prompt asking for `n` in binary: the question, then the trace's first line."""
    return f"{PROMPT_PREFIX}{n}:\n{_lines(n)[0]}\n"


def trace(n: int) -> str:
    """The reference answer for `n`: its halving lines after the first, newline-separated, no final newline."""
    return "\n".join(_lines(n)[1:])


def _lines(n: int) -> list[str]:
    """Every line of the halving trace of `n`, the first (the number itself, no bits yet) included."""
    if not 1 <= n < min(10**Q_WIDTH, 2**BITS_WIDTH):
        raise ValueError(f"n must be in [1, {min(10**Q_WIDTH, 2**BITS_WIDTH)}), got {n}")
    lines: list[str] = []
    q, bits = n, ""
    while True:
        quotient = str(q).rjust(Q_WIDTH, BLANK) if q else BLANK * Q_WIDTH
        lines.append(f"{quotient} {bits.ljust(BITS_WIDTH, BLANK)}")
        if q == 0:
            return lines
        bits = str(q % 2) + bits
        q //= 2


def make_problem(n: int) -> Problem:
    """The prompt, reference trace and final answer for `n`."""
    return Problem(n=n, prompt=prompt_for(n), answer=trace(n), target=format(n, "b"))


def sample_numbers(seed: int, count: int, *, exclude: Iterable[int] = ()) -> list[int]:
    """`count` distinct numbers, bit length uniform in [MIN_BITS, MAX_BITS], none in `exclude`.

    Deterministic in `seed`. WHY uniform bit length rather than uniform n: it spreads answer lengths
    evenly over 138..368 tokens, where uniform n would make nearly every answer the longest.
    """
    excluded = set(exclude)
    capacity = sum(2 ** (b - 1) for b in range(MIN_BITS, MAX_BITS + 1)) - len(excluded)
    if count > capacity:
        raise ValueError(f"asked for {count} distinct numbers, only {capacity} available")
    rng = random.Random(seed)
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < count:
        bits = rng.randint(MIN_BITS, MAX_BITS)
        n = rng.randrange(2 ** (bits - 1), 2**bits)
        if n not in excluded and n not in seen:
            seen.add(n)
            out.append(n)
    return out


def generate(seed: int, count: int, *, exclude: Iterable[int] = ()) -> list[Problem]:
    """`count` distinct problems (deterministic in `seed`), none for a number in `exclude`."""
    return [make_problem(n) for n in sample_numbers(seed, count, exclude=exclude)]


def number_in_prompt(prompt: str) -> int:
    """The number a prompt asks about; ValueError if the prompt is not one of this task's."""
    head, _, _ = prompt.partition(":")
    digits = head.removeprefix(PROMPT_PREFIX)
    if not (head.startswith(PROMPT_PREFIX) and digits.isdigit() and prompt == prompt_for(int(digits))):
        raise ValueError(f"not a task prompt: {prompt!r}")
    return int(digits)


def extract_answer(completion: str) -> str | None:
    """The final answer of a generated trace: the register of its last line, blanks stripped.

    None when the last line is not a finished line (quotient all blank, register of 0/1 bits then
    blanks), e.g. a generation cut off mid-trace.
    """
    last = completion.rstrip("\n").rsplit("\n", 1)[-1]
    if len(last) != Q_WIDTH + 1 + BITS_WIDTH or last[:Q_WIDTH] != BLANK * Q_WIDTH or last[Q_WIDTH] != " ":
        return None
    register = last[Q_WIDTH + 1 :]
    bits = register.rstrip(BLANK)
    if not bits or set(bits) - {"0", "1"}:
        return None
    return bits


def is_correct(prompt: str, completion: str, *, finished: bool = True) -> bool:
    """Exact match: the generation stopped on EOS and its final answer is the prompt's number in binary.

    WHY `finished` counts: a student trained on truncated prefixes must still end its answers; a
    generation that ran out of tokens is wrong even if its last line happens to hold the right bits.
    The intermediate lines are not checked (they determine the answer; a lucky wrong trace is rare).
    """
    if not finished:
        return False
    return extract_answer(completion) == format(number_in_prompt(prompt), "b")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: one token per character of `ALPHABET`, plus <pad> <eos> <unk>.

    No BOS and no post-processor (see the module docstring). WHY WordLevel over single characters: a
    fixed vocabulary with no merges, and decoding round-trips exactly (`Fuse` joins without spaces).
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def write_jsonl(path: Path, problems: Iterable[Problem]) -> None:
    """One ``{"prompt", "continuation", "answer"}`` object per line.

    Prompt loaders read only `prompt`; `continuation` (the reference trace) is what `opd cache warm`
    scores and supervised warm-up trains on; `answer` is the expected final answer, for readers.
    """
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "continuation": p.answer, "answer": p.target}) + "\n")


def read_prompts(path: Path) -> list[str]:
    """The `prompt` of every non-blank line of a JSONL file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]
