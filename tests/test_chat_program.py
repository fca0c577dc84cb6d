"""`anemll-fast chat` through a pseudo-terminal (pexpect): line editing, history,
multi-line input, commands, Ctrl-C stopping a reply, Ctrl-D leaving; and piped."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anemll_fast.testing.tiny import build_tiny_model

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]

# Runs the real CLI; each decode step sleeps a little and the model never ends
# its turn, so that a Ctrl-C reliably lands in the middle of a reply.
HARNESS = """
import sys, time
import anemll_fast.engine as engine
import anemll_fast.tokenizer as tokenizer
step = engine.Engine.step
engine.Engine.step = lambda self, token, pos: (time.sleep(0.1), step(self, token, pos))[1]
tokenizer.Tokenizer._end_ids = lambda self: set()
from anemll_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("chat") / "m", arch="qwen3", num_chunks=1, context_length=512,
                            batch_size=8, tied=False, split_lm_head=2, seed=4)


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, PYTHONPATH=str(REPO), ANEMLL_FAST_CACHE=str(tmp_path / "cache"),
                PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")


def spawn(tiny, env, *extra):
    child = pexpect.spawn(sys.executable, ["-c", HARNESS, "chat", "--model", str(tiny.path), "--backend",
                                           "reference", "--max-tokens", "8", *extra],
                          env=env, encoding="utf-8", timeout=30, dimensions=(40, 200), cwd=str(REPO))
    child.expect(">>>")
    return child


def saved(path):
    with np.load(path) as z:
        return json.loads(str(z["header"]))["session"]


PROMPT = "\x1b[?2004h"  # prompt_toolkit starts every prompt by turning on bracketed paste


def reply(child):
    child.expect(r"finish: (\w+)")
    finish = child.match.group(1)
    text = child.before + child.after
    child.expect(r"\)\r\n")
    text += child.before
    child.expect_exact(PROMPT)
    return finish, text


def command(child, line, pattern):
    """Send a command; the text up to its answer matching `pattern`."""
    child.send(line + "\r")
    child.expect(pattern)
    text = child.before + child.after
    child.expect_exact(PROMPT)
    return text


@pytest.mark.slow
def test_chat_session_in_a_terminal(tiny, env, tmp_path):
    child = spawn(tiny, env, "--system", "Be brief.")
    try:
        # Line editing: "Hllo" then three times Left, "e": the message is "Hello".
        child.send("Hllo")
        child.send("\x1b[D\x1b[D\x1b[D")
        child.send("e\r")
        finish, text = reply(child)
        assert finish == "length" and "max tokens reached (8)" in text
        # Multi-line: a message in triple quotes, and Esc Enter for a new line.
        child.send('"""first line\r')
        child.send('second line"""\r')
        reply(child)
        child.send("third\x1b\rfourth\r")
        reply(child)
        # Ctrl-C stops the reply being generated; the session goes on.
        child.send("Tell me a long story\r")
        child.expect_exact("\x1b[?2004l")  # the line editor has handed the message over
        time.sleep(0.3)  # a few of the slowed-down decode steps
        child.sendintr()
        finish, text = reply(child)
        assert finish == "interrupted" and "stopped with Ctrl-C" in text
        import re

        assert 0 < int(re.search(r"decode: (\d+) tokens", text).group(1)) < 8  # stopped mid-reply
        text = command(child, "/stats", r"finish: \w+")
        assert "4 turns" in text and "finish: interrupted" in text
        assert "/save FILE" in command(child, "/help", r"Ctrl-D leaves\.")
        command(child, "/system Answer in French.", "system prompt set")
        first = tmp_path / "first.npz"
        assert "saved 9 messages" in command(child, f"/save {first}", r"saved \d+ messages")
        command(child, "/reset", "conversation cleared")
        command(child, "/bogus", "unknown command /bogus")
        assert "no such file" in command(child, f"/load {tmp_path / 'missing.npz'}", r"error: [^\r]*")
        second = tmp_path / "second.npz"
        command(child, f"/save {second}", r"saved \d+ messages")
        assert "loaded 9 messages" in command(child, f"/load {first}", r"loaded \d+ messages")
        child.send("And then?\r")
        reply(child)
        # Ctrl-C at the prompt clears the line; Ctrl-D leaves.
        child.send("never sent")
        child.sendintr()
        child.expect_exact(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    s = saved(first)
    users = [m["content"] for m in s["messages"] if m["role"] == "user"]
    assert users == ["Hello", "first line\nsecond line", "third\nfourth", "Tell me a long story"]
    assert s["system"] == "Answer in French." and s["messages"][0] == {"role": "system",
                                                                      "content": "Answer in French."}
    stopped = s["messages"][-1]
    # The partial reply stayed (random byte-level tokens may not have made whole characters yet).
    assert stopped["role"] == "assistant" and isinstance(stopped["content"], str)
    assert [m["role"] for m in saved(second)["messages"]] == ["system"]  # /reset kept the system prompt


@pytest.mark.slow
def test_history_survives_a_restart(tiny, env, tmp_path):
    child = spawn(tiny, env)
    try:
        child.send("remember me\r")
        reply(child)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    child = spawn(tiny, env)
    out = tmp_path / "s.npz"
    try:
        child.send("\x1b[A\r")  # Up: the last line of the previous run
        reply(child)
        command(child, f"/save {out}", r"saved \d+ messages")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert [m["content"] for m in saved(out)["messages"] if m["role"] == "user"] == ["remember me"]


def test_piped_input_has_no_escape_codes(tiny, env, tmp_path):
    out = tmp_path / "p.npz"
    proc = subprocess.run([sys.executable, "-c", HARNESS, "chat", "--model", str(tiny.path), "--backend",
                           "reference", "--max-tokens", "3"], input=f"Hi\n/save {out}\n", env=env,
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    assert "finish: length (max tokens reached (3))" in proc.stderr
    assert [m["role"] for m in saved(out)["messages"]] == ["user", "assistant"]
