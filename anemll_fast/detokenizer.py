"""Streaming text out of token ids: never broken UTF-8, stop strings honoured.

Byte-level BPE can split one character over several tokens, and a stop string
can span tokens. Text is released only when it is complete and cannot be the
start of a stop string; nothing after a stop string is ever released.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple


class StreamingDetokenizer:
    """Feed token ids one by one; get back the text that is safe to show."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: List[int] = []
        self._text = ""  # decoded text of all ids, complete characters only
        self._emitted = 0  # chars of _text already released
        # Only a short window of ids is decoded per token (as HF's TextStreamer):
        # ids[_prefix:_read] were decoded last time; decoding from _prefix keeps
        # the context a tokenizer needs at the boundary (leading spaces).
        self._prefix = 0
        self._read = 0
        self.stopped: Optional[str] = None  # the stop string that ended the text

    @property
    def text(self) -> str:
        """All text released so far (without any stop string)."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Take one id; return the newly released text (maybe empty)."""
        if self.stopped is not None:
            return ""
        self._ids.append(token_id)
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more ids: release what was held back for a possible stop string."""
        if self.stopped is not None:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        before = self._decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(self._ids[self._prefix:])
        # A trailing U+FFFD means the last token ended inside a character: wait,
        # unless nothing more will come.
        if (after.endswith("\ufffd") and not final) or len(after) < len(before):
            return
        self._text += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        start = self._emitted
        # Search a little before the released text: a stop string may begin there.
        search_from = max(0, start - max((len(s) for s in self._stop), default=0))
        hit: Optional[Tuple[int, str]] = None
        for s in self._stop:
            pos = self._text.find(s, search_from)
            if pos != -1 and (hit is None or pos < hit[0]):
                hit = (pos, s)
        if hit is not None:
            self.stopped = hit[1]
            end = max(hit[0], start)
            out = self._text[start:end]
            self._emitted = end
            return out
        end = len(self._text)
        if not final:
            end -= self._held_back(self._text, start)
        out = self._text[start:end]
        self._emitted = end
        return out

    def _held_back(self, text: str, start: int) -> int:
        """Chars at the end of `text` that could be the start of a stop string."""
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text) - start), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep
