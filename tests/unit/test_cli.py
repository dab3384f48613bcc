"""The `opd` command line: help without heavy imports, option tables, clear errors, exit codes.

Pins: `opd learner --help` lists every learner option with its default; `--help` does not import
torch (so it answers fast); a bad config key exits 2 naming the key; a role without a Redis URL exits
1 with a message saying what to set; `opd config show` prints YAML that loads back to the same config,
the Redis password redacted; a reader that closes the pipe early (`| head -1`) ends the CLI quietly with 141.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.config import LearnerConfig
from opd.cli import main
from opd.config import OPDConfig, describe

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opd.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)})


def test_learner_help_lists_every_option() -> None:
    out = run_cli("learner", "--help")
    assert out.returncode == 0, out.stderr
    for key, default, _text in describe(LearnerConfig, prefix="learner."):
        assert key in out.stdout, key
        assert default in out.stdout, (key, default)


def test_help_does_not_import_torch() -> None:
    code = "import sys; from opd.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_bad_key_exits_2_and_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "learner.nope=1"]) == 2
    assert "learner.nope" in capsys.readouterr().err


def test_role_without_redis_says_what_to_set(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPD_REDIS_URL", raising=False)
    assert main(["actor"]) == 1
    assert "transport.redis_url" in capsys.readouterr().err


def test_config_show_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(REPO / "configs" / "demo-cpu.yaml"), "--set", "learner.lr=0.5"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    cfg = OPDConfig.model_validate(tree)
    assert cfg.learner.lr == 0.5 and cfg.run.actors == 2


def test_up_with_missing_model_dir_is_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["up", "--config", str(REPO / "configs" / "demo-cpu.yaml"), "--set", "run.tiny_assets=null",
                 "--set", f"actor.model_dir={tmp_path / 'missing'}", "--set", f"run.workdir={tmp_path}"])
    assert code == 1
    assert "actor.model_dir" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["--set", "OPD_REDIS_URL"])
def test_config_show_never_prints_the_redis_password(source: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis://:secret@127.0.0.1:6379/0"
    monkeypatch.delenv("OPD_REDIS_URL", raising=False)
    if source == "--set":
        argv = ["config", "show", "--set", f"transport.redis_url={url}"]
    else:  # a password the user never typed on this command line: filled in from the environment
        monkeypatch.setenv("OPD_REDIS_URL", url)
        argv = ["config", "show"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "secret" not in out + err
    assert yaml.safe_load(out)["transport"]["redis_url"] == "redis://:***@127.0.0.1:6379/0"



def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    """`opd config docs | head -1`: the reader goes away after one line; no error line, no traceback.

    The pipe is shrunk to one page so that the output cannot fit in it: the CLI is still writing when
    the reader closes, so it meets the closed pipe for sure (a 64 KiB pipe would swallow it all first).
    """
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("F_SETPIPE_SZ is Linux-only")
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    with open(tmp_path / "stderr", "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "config", "docs"], cwd=REPO, stdout=write_fd,
                                stderr=errf, env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)})
    os.close(write_fd)
    first = b""
    while not first.endswith(b"\n"):  # one byte at a time: read the first line and nothing more
        chunk = os.read(read_fd, 1)
        assert chunk, "opd config docs ended before its first line"
        first += chunk
    os.close(read_fd)
    assert proc.wait(timeout=120) == 141
    assert first.strip()
    assert (tmp_path / "stderr").read_text() == ""
