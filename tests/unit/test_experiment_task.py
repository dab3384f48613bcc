"""The experiment task: generator, trace, exact-match checker, tokenizer, answer lengths.

Pins: the generator is a pure function of its seed; every reference trace is a correct halving
trace whose last line holds n in binary (checked line by line against integer arithmetic, not
against the generator's own code); the checker accepts exactly the right final answers of finished
generations; the tokenizer round-trips any task text through `AutoTokenizer.from_pretrained`, adds no
BOS either way, and ends answers with EOS; answers are hundreds of tokens long.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from opd.experiment import task


def test_generator_is_deterministic_in_its_seed() -> None:
    first, again, other = task.generate(7, 200), task.generate(7, 200), task.generate(8, 200)
    assert first == again
    assert [p.n for p in first] != [p.n for p in other]
    assert len({p.n for p in first}) == 200  # distinct


def test_generator_honours_exclusions_and_capacity() -> None:
    held = {p.n for p in task.generate(1, 300)}
    assert not held & {p.n for p in task.generate(2, 3000, exclude=held)}
    with pytest.raises(ValueError, match="only"):
        task.sample_numbers(0, 10**6)


@pytest.mark.parametrize("n", [1, 2, 13, 32, 255, 256, 1000, 40961, 65535])
def test_trace_is_a_correct_halving_trace(n: int) -> None:
    problem = task.make_problem(n)
    first = problem.prompt.split("\n")[1]
    lines = [first, *problem.answer.split("\n")]
    assert all(len(line) == task.LINE_CHARS - 1 for line in lines)
    q, bits = n, ""
    for line in lines:
        quotient, register = line.split(" ")
        assert quotient == (str(q).rjust(task.Q_WIDTH, ".") if q else "." * task.Q_WIDTH)
        assert register == bits + "." * (task.BITS_WIDTH - len(bits))
        bits, q = str(q % 2) + bits, q // 2
    assert q == 0 and lines[-1].endswith(problem.target + "." * (task.BITS_WIDTH - len(problem.target)))
    assert int(problem.target, 2) == n
    assert len(lines) == n.bit_length() + 1


def test_checker_accepts_right_answers_only() -> None:
    p = task.make_problem(13)
    assert task.is_correct(p.prompt, p.answer)
    assert task.is_correct(p.prompt, p.answer + "\n")  # a trailing newline before EOS is harmless
    assert not task.is_correct(p.prompt, p.answer, finished=False)  # ran out of tokens: wrong
    wrong_bit = p.answer[: -task.BITS_WIDTH] + "1100" + "." * (task.BITS_WIDTH - 4)
    assert not task.is_correct(p.prompt, wrong_bit)
    assert not task.is_correct(p.prompt, p.answer.rsplit("\n", 1)[0])  # cut off one line early
    assert not task.is_correct(p.prompt, p.answer[:-3])  # cut mid-line
    assert not task.is_correct(p.prompt, "")
    assert not task.is_correct(p.prompt, "..... 11a1............")
    assert not task.is_correct(task.make_problem(14).prompt, p.answer)  # right format, other number
    assert task.extract_answer(p.answer) == "1101"


def test_checker_rejects_foreign_prompts() -> None:
    for prompt in ("up 3 5:", "binary of 13:\n", "binary of x:\n", task.prompt_for(13).replace("13", "12", 1)):
        with pytest.raises(ValueError, match="not a task prompt"):
            task.number_in_prompt(prompt)


def test_tokenizer_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    task.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (task.EOS_ID, task.PAD_ID, None)
    assert len(tok) == len(task.SPECIAL_TOKENS) + len(task.ALPHABET)
    for p in task.generate(3, 20):
        text = p.prompt + p.answer
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=True) == tok(text)["input_ids"]  # no BOS, ever
        assert len(ids) == len(text) and task.UNK_ID not in ids  # one token per character
        assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("..... 1101"), task.EOS_ID], skip_special_tokens=True) == "..... 1101"
    assert tok.encode("A") == [task.UNK_ID]


def test_answers_are_hundreds_of_tokens() -> None:
    tok = task.build_tokenizer()
    problems = task.generate(0, 2000)
    lengths = [len(tok.encode(p.answer)) + 1 for p in problems]  # + EOS
    assert min(lengths) == task.MIN_BITS * task.LINE_CHARS  # the shortest possible answer occurs ...
    assert max(lengths) == task.MAX_BITS * task.LINE_CHARS  # ... and so does the longest
    assert 250 <= statistics.mean(lengths) <= 310
    assert sum(length >= 200 for length in lengths) / len(lengths) > 0.6
