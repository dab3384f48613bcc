"""`opd cache ...` refuses bad usage with exit code 2 and a message naming what to fix, before any work.

No Redis and no model here: every case must be caught before either is needed (a wrong setting
should cost a second, not a model load). Port 1 on loopback refuses connections, which stands in
for an unreachable Redis (exit code 1: the operation failed, the usage was fine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache import cli as cache_cli
from cache import warm as cache_warm
from opd import cli as opd_cli
from opd.tiny import BOS_ID, EOS_ID, build_tokenizer

UNREACHABLE = "redis://127.0.0.1:1/0"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = opd_cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cache_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        opd_cli.main(["cache"])
    assert exc.value.code == 2
    assert "cache_command" in capsys.readouterr().err  # argparse names what is missing
    with pytest.raises(SystemExit) as exc:
        opd_cli.main(["cache", "warm"])  # --prompts is required
    assert exc.value.code == 2
    assert "--prompts" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["stats", "verify", "rebuild-index"])
def test_missing_cache_dir_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    code, _, err = run(capsys, "cache", command, "--set", f"teacher.cache_dir={tmp_path / 'nope'}",
                       "--set", f"transport.redis_url={UNREACHABLE}")
    assert code == 2
    assert "teacher.cache_dir" in err and "no teacher cache" in err


def test_missing_redis_url_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cache.root import CacheRoot

    monkeypatch.delenv("OPD_REDIS_URL", raising=False)
    CacheRoot(tmp_path / "c", create=True)
    code, _, err = run(capsys, "cache", "stats", "--set", f"teacher.cache_dir={tmp_path / 'c'}")
    assert code == 2
    assert "transport.redis_url" in err and "OPD_REDIS_URL" in err
    assert "Traceback" not in err


def test_unreachable_redis_is_a_failure_not_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from cache.root import CacheRoot

    CacheRoot(tmp_path / "c", create=True)
    code, _, err = run(capsys, "cache", "stats", "--set", f"teacher.cache_dir={tmp_path / 'c'}",
                       "--set", "transport.redis_url=redis://:s3cret@127.0.0.1:1/0")
    assert code == 1
    assert "127.0.0.1:1" in err and "Traceback" not in err
    assert "s3cret" not in err  # never print the password


def test_evict_needs_a_budget(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "cache", "evict", "--set", f"transport.redis_url={UNREACHABLE}",
                       "--set", f"teacher.cache_dir={tmp_path}")
    assert code == 2
    assert "teacher.cache_budget_bytes" in err


def warm(capsys: pytest.CaptureFixture[str], tmp_path: Path, lines: list[str], *extra: str) -> tuple[int, str]:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "cache", "warm", "--prompts", str(data), *extra,
                       "--set", f"transport.redis_url={UNREACHABLE}", "--set", f"teacher.model_dir={tmp_path}",
                       "--set", f"teacher.cache_dir={tmp_path / 'cache'}")
    return code, err


def test_warm_lists_every_bad_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = warm(capsys, tmp_path, [
        '{"ids": [1, 2, 3]}',
        "not json",
        '{"ids": [1, "2"]}',
        '{"ids": [1, -4]}',
        '{"ids": []}',
        '{"ids": [1], "prompt": "x"}',
        '{"prompt": "up 1 2:", "response": 3}',
        '{"text": "hello"}',
        "[1, 2]",
    ])
    assert code == 2, err
    for lineno, words in [(2, "invalid JSON"), (3, "must be integers"), (4, "outside"), (5, "non-empty list"),
                          (6, "not both"), (7, "must be a string"), (8, "missing 'ids'"), (9, "JSON object")]:
        assert f"data.jsonl:{lineno}: " in err and words in err, (lineno, words, err)
    assert "data.jsonl:1:" not in err
    assert "Traceback" not in err


def test_warm_ids_only_refuses_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = warm(capsys, tmp_path, ['{"prompt": "up 1 2:"}'], "--ids-only")
    assert code == 2 and "--ids-only" in err and "data.jsonl:1" in err


def test_warm_refuses_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = warm(capsys, tmp_path, ['{"ids": [1, 2]}'], "--batch-size", "0")
    assert code == 2 and "--batch-size" in err
    code, err = warm(capsys, tmp_path, ['{"ids": [1, 2]}'], "--writer-id", "a/b")
    assert code == 2 and "--writer-id" in err
    code, err = warm(capsys, tmp_path, [""])
    assert code == 2 and "no sequences" in err
    code, _, err = run(capsys, "cache", "warm", "--prompts", str(tmp_path / "missing.jsonl"),
                       "--set", f"transport.redis_url={UNREACHABLE}", "--set", f"teacher.model_dir={tmp_path}")
    assert code == 2 and "missing.jsonl" in err


def test_warm_needs_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"ids": [1, 2]}\n')
    code, _, err = run(capsys, "cache", "warm", "--prompts", str(data), "--set", f"transport.redis_url={UNREACHABLE}")
    assert code == 2 and "--model" in err and "teacher.model_dir" in err
    code, _, err = run(capsys, "cache", "warm", "--prompts", str(data), "--model", str(tmp_path / "nope"),
                       "--set", f"transport.redis_url={UNREACHABLE}")
    assert code == 2 and "not a directory" in err


def test_parse_warm_file_accepts_ids_and_text(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        json.dumps({"ids": [5, 6, 7]}),
        "",
        json.dumps({"prompt": "up 1 2:", "continuation": " 3 4"}),
        json.dumps({"prompt": "down c b:", "response": " a", "extra": 1}),
        json.dumps({"prompt": "up a b:"}),
    ]) + "\n")
    lines = cache_warm.parse_warm_file(path, ids_only=False)
    assert [ln.lineno for ln in lines] == [1, 3, 4, 5]
    assert lines[0].ids is not None and lines[0].ids.tolist() == [5, 6, 7] and lines[0].ids.dtype == np.int32
    assert (lines[1].prompt, lines[1].response) == ("up 1 2:", " 3 4")
    assert (lines[2].prompt, lines[2].response) == ("down c b:", " a")
    assert lines[3].response is None


def test_encode_text_matches_the_actor_prompt_encoding() -> None:
    """No chat template: the prompt as actors encode it (this tokenizer adds BOS), the response's
    plain tokens, then EOS if asked; `actor.add_bos=false` drops the BOS here as it does for actors."""
    from protocol.prompts import PromptFormat, encode_prompt

    tok = build_tokenizer()
    line = cache_warm.WarmLine(1, prompt="up 1 2:", response=" 3 4")
    ids = cache_warm.encode_text(tok, line, PromptFormat(), append_eos=True).tolist()
    expected = [BOS_ID, *tok.encode("up 1 2:", add_special_tokens=False), *tok.encode(" 3 4", add_special_tokens=False)]
    assert ids == [*expected, EOS_ID]
    no_bos = PromptFormat(add_bos=False)
    assert cache_warm.encode_text(tok, line, no_bos, append_eos=False).tolist() == expected[1:]
    assert expected[1:1 + 7] == encode_prompt(tok, "up 1 2:", no_bos)


def test_redact_url() -> None:
    assert cache_cli.redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert cache_cli.redact_url("redis://user:pw@host/0") == "redis://user:***@host/0"
    assert cache_cli.redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_human_bytes() -> None:
    assert cache_cli.human_bytes(512) == "512 B"
    assert cache_cli.human_bytes(1536) == "1.5 KiB"
    assert cache_cli.human_bytes(3 * 1024**3) == "3.0 GiB"
