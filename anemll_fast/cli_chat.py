"""`anemll-fast chat`: an interactive chat that behaves like a terminal program.

On a terminal the input line is prompt_toolkit's: line editing, history kept
across runs, Alt-Enter (or Esc Enter) for a new line, and a message opened
with three quotes runs until they close. Ctrl-C stops the reply being
generated and keeps the session (at the prompt it clears the line), Ctrl-D
leaves. Piped input is read line by line, without any of that.

Commands: /reset, /system TEXT, /save FILE, /load FILE, /stats, /help, /exit.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List, Optional

from anemll_fast.errors import AnemllError

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone shows it; /system - removes it)
  /save FILE      save the conversation and its KV cache
  /load FILE      continue a saved conversation (same model)
  /stats          speeds, tokens and why the last reply ended
  /help           this help
  /exit           leave (or Ctrl-D)
Enter sends; Alt-Enter or Esc Enter starts a new line; a message opened with \"\"\" runs until \"\"\".
Ctrl-C stops a reply (the session stays); Ctrl-D leaves."""

def _terminal_reader(history_file: Optional[str]) -> Callable[[], str]:
    """prompt_toolkit's line editor; raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("enter")
    def _enter(event: Any) -> None:
        buf = event.current_buffer
        text = buf.text
        if text.lstrip().startswith('"""') and not (len(text.strip()) > 3 and text.rstrip().endswith('"""')):
            buf.insert_text("\n")  # inside a """ block
        else:
            buf.validate_and_handle()

    history: Any = InMemoryHistory()
    if history_file:
        try:
            from pathlib import Path

            Path(history_file).parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(history_file)
        except OSError:
            pass
    session: Any = PromptSession(history=history, key_bindings=keys, multiline=True,
                                 prompt_continuation=lambda width, line, wrap: "... ".rjust(width))
    return lambda: session.prompt(">>> ")


def _pipe_reader() -> Callable[[], str]:
    def read() -> str:
        raw = sys.stdin.buffer.readline()  # bytes: a non-UTF-8 line must not end the session
        if not raw:
            raise EOFError
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            print(f"[error: the input is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                  "line ignored]", file=sys.stderr)
            return ""

    return read


def _message(text: str) -> str:
    s = text.strip()
    if s.startswith('"""'):
        s = s[3:]
        if s.endswith('"""'):
            s = s[:-3]
        s = s.strip("\n")
    return s


def run_chat(args: argparse.Namespace) -> int:
    from anemll_fast.chat import ChatSession
    from anemll_fast.cli_generate import _sampling, load_from_args, stats_line
    from anemll_fast.default_model import cache_root
    from anemll_fast.progress import note

    interactive = sys.stdin.isatty()
    with load_from_args(args, announce=True) as model:
        session = ChatSession(model, system=args.system, enable_thinking=False if args.no_think else None,
                              context_shift=args.context_shift, **_sampling(args))
        note(f"[{model.backend} backend, context {model.context_length}; /help for commands, Ctrl-D leaves]")
        read = _terminal_reader(str(cache_root() / "chat_history")) if interactive else _pipe_reader()
        last: Any = None
        last_finish: Optional[str] = None
        while True:
            try:
                raw = read()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            text = _message(raw)
            if not text:
                continue
            if text.startswith("/"):
                if _command(text, session, last, last_finish):
                    break
                continue
            finish: Optional[str] = None
            reply = session.stream(text)
            try:
                for r in reply:
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
                    last = r
                    finish = r.finish_reason
            except KeyboardInterrupt:
                reply.close()  # the partial reply joins the history now, not at garbage collection
                finish = "interrupted"
            except (AnemllError, ValueError) as exc:
                print(f"\n[error: {exc}]", file=sys.stderr)
                continue
            print()
            last_finish = finish
            if last is not None:
                print(stats_line(last, finish, session.settings), file=sys.stderr, flush=True)
    return 0


def _command(text: str, session: Any, last: Any, last_finish: Optional[str]) -> bool:
    """Run a /command; True to leave."""
    from anemll_fast.cli_generate import stats_line

    name, _, arg = text.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit", "/bye"):
            return True
        if name == "/help":
            print(HELP, file=sys.stderr)
        elif name == "/reset":
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
        elif name == "/system":
            if not arg:
                print(f"[system prompt: {session.system!r}]", file=sys.stderr)
            else:
                session.system = None if arg == "-" else arg
                rest = [m for m in session.messages if m.get("role") != "system"]
                session.messages = ([{"role": "system", "content": session.system}] if session.system else []) + rest
                print("[system prompt " + ("removed" if session.system is None else "set") + "]", file=sys.stderr)
        elif name in ("/save", "/load"):
            if not arg:
                raise ValueError(f"{name} needs a file name")
            saving = name == "/save"
            (session.save if saving else session.load)(arg)
            print(f"[{'saved' if saving else 'loaded'} {len(session.messages)} messages and "
                  f"{session.model.engine.length} cached tokens {'to' if saving else 'from'} {arg}]", file=sys.stderr)
        elif name == "/stats":
            turns = sum(m.get("role") == "user" for m in session.messages)
            print(f"[{turns} turns, {session.model.engine.length}/{session.model.context_length} tokens in the "
                  f"KV cache, {session.model.backend} backend]", file=sys.stderr)
            if last is not None:
                print(stats_line(last, last_finish, session.settings), file=sys.stderr)
        else:
            print(f"[unknown command {name}; /help lists them]", file=sys.stderr)
    except (AnemllError, ValueError, OSError) as exc:
        print(f"[error: {exc}]", file=sys.stderr)
    return False
