"""Progress bars on a terminal only: a long prefill and a conversion, through a
pseudo-terminal and through a pipe, with and without --quiet."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anemll_fast.testing.tiny import build_tiny_model

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("prog") / "m", arch="llama", context_length=64, batch_size=4,
                            seed=2)


def env():
    return dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm")


def in_terminal(args):
    out, status = pexpect.run(f"{sys.executable} -m anemll_fast " + " ".join(args), env=env(), cwd=str(REPO),
                              timeout=120, withexitstatus=True, encoding="utf-8")
    assert status == 0, out
    return out


def piped(args):
    proc = subprocess.run([sys.executable, "-m", "anemll_fast", *args], env=env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_long_prefill_shows_a_bar_on_a_terminal_only(tiny):
    args = ["generate", "--model", str(tiny.path), "--backend", "reference", "--max-tokens", "2",
            "--prompt-ids", ",".join(str(5 + i % 50) for i in range(40))]
    bar = re.compile(r"prefill:\s+\d+%\|.*\| \d+/39")  # the last prompt token goes through infer
    assert bar.search(in_terminal(args))
    assert not bar.search(in_terminal(args + ["--quiet"]))
    out = piped(args)
    assert "\x1b" not in out and "\r" not in out and "prefill: " in out  # the stats line, no bar
    assert not bar.search(out)


class _Stderr(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_conversion_stages(monkeypatch, tty):
    """The converter's stage display: a bar whose label follows the steps on a
    terminal, else plain lines (no escape codes), and nothing when quiet."""
    from anemll_fast import progress
    from anemll_fast.convert.pipeline import _Progress

    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    p = _Progress(True, total=2)
    p.stage("embeddings")
    p.end("embeddings")
    p.stage("FFN chunk 1/1")
    p.step("FFN chunk 1/1: prefill")
    if tty:
        assert "FFN chunk 1/1: prefill" in err.getvalue() or p.bar.desc == "FFN chunk 1/1: prefill"
    p.end("FFN chunk 1/1")
    p.close()
    out = err.getvalue()
    if tty:
        assert re.search(r"\| 2/2 \[", out) and "stage" in out
    else:
        assert "\x1b" not in out and "\r" not in out
        assert [line.split(" (")[0] for line in out.splitlines()] == ["[1/2] embeddings", "[2/2] FFN chunk 1/1"]
    progress.set_quiet(True)
    try:
        err.seek(0)
        err.truncate()
        q = _Progress(True, total=1)
        q.stage("x")
        q.end("x")
        q.close()
        assert err.getvalue() == ""
    finally:
        progress.set_quiet(False)
