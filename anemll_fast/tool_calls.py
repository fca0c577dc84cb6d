"""Tool calls in a model's output, in the formats of the supported models' chat templates.

- "hermes": Qwen 2.5/3 (and our fallback prompt for templates without tools):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
- "llama3_json": Llama 3.x: the whole reply is `{"name": ..., "parameters": {...}}`
  (after `<|python_tag|>`, a special token the detokenizer drops), calls separated by ";".

Output that does not parse as calls to the offered tools stays plain content:
a model's malformed call is the model's answer, never a server error.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


def detect_format(template: Optional[str]) -> str:
    """The tool-call format a chat template teaches its model."""
    text = template or ""
    if HERMES_OPEN in text:
        return "hermes"
    if "<|python_tag|>" in text or ("<|eot_id|>" in text and "parameters" in text):
        return "llama3_json"
    return "hermes"  # templates without tools get our Hermes-format system prompt


def tool_names(tools: Optional[Sequence[Mapping[str, Any]]]) -> List[str]:
    return [t["function"]["name"] for t in tools or () if isinstance(t.get("function"), Mapping)]


def _call(obj: Any, names: Sequence[str]) -> Optional[Dict[str, Any]]:
    """An OpenAI tool call from one parsed {"name", "arguments"|"parameters"} object, if valid."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_calls(text: str, names: Sequence[str]) -> Optional[List[Dict[str, Any]]]:
    """Calls from a reply that is nothing but JSON call objects (a list, or ';'-separated)."""
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        items = json.loads(body)
        objs = items if isinstance(items, list) else [items]
    except ValueError:
        try:
            objs = [json.loads(piece) for piece in body.split(";") if piece.strip()]
        except ValueError:
            return None
    calls = [_call(o, names) for o in objs]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def parse(text: str, fmt: str, names: Sequence[str]) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """(content, tool_calls) of a complete reply; content is None when the reply is only calls."""
    if not names:
        return text, []
    if HERMES_OPEN in text:
        calls = []
        for body in _HERMES_BLOCK.findall(text):
            try:
                call = _call(json.loads(body), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = _HERMES_BLOCK.sub("", text).strip()
        return content or None, calls
    calls_json = _json_calls(text, names)
    if calls_json is not None:
        return None, calls_json
    return text, []


class ToolCallStream:
    """Streams content while holding back what may be a tool call, for parse() at the end."""

    def __init__(self, fmt: str, names: Sequence[str]) -> None:
        self.fmt = fmt
        self.names = list(names)
        self._text = ""
        self._emitted = 0
        self._holding = False  # a call has begun: nothing more is content until the end

    def feed(self, delta: str) -> str:
        """Text that is surely content, now."""
        self._text += delta
        if not self.names:
            return self._flush(len(self._text))
        if self._holding:
            return ""
        before, pending = self._text[:self._emitted], self._text[self._emitted:]
        if not before.strip():
            if pending.lstrip().startswith(("{", "[")):
                self._holding = True  # a bare JSON reply: Llama 3's format
                return ""
            if not pending.strip():
                return ""  # only whitespace so far: a JSON call may follow
        k = pending.find(HERMES_OPEN)
        if k >= 0:
            self._holding = True
            return self._flush(self._emitted + k)
        return self._flush(len(self._text) - _partial_suffix(pending, HERMES_OPEN))

    def finish(self) -> Tuple[str, List[Dict[str, Any]]]:
        """(content not yet streamed, tool calls) at the end of the reply."""
        content, calls = parse(self._text, self.fmt, self.names)
        if calls:
            return "", calls
        return self._flush(len(self._text)), []

    def _flush(self, end: int) -> str:
        out = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def forced_call_grammar(tokenizer: Any, fmt: str, tools: Sequence[Mapping[str, Any]], name: Optional[str] = None) -> Any:
    """A grammar that makes the reply one call (to `name`, or to any of `tools`),
    for tool_choice "required" or a named function."""
    from anemll_fast.grammar import JSON_DEFAULTS, Grammar, GrammarError

    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice: no tool named {name!r} among {tool_names(tools)}")
    key = "parameters" if fmt == "llama3_json" else "arguments"
    variants = []
    for t in chosen:
        params = t["function"].get("parameters") or {"type": "object"}
        variants.append({"type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: params},
                         "required": ["name", key], "additionalProperties": False})
    schema: Dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if fmt == "llama3_json":
        return Grammar.json_schema(tokenizer, schema)

    def literal(text: str) -> str:
        tid = tokenizer.token_to_id(text)
        # Added tokens (Qwen's <tool_call>) are matched by id: llguidance does not spell them out.
        return f"<[{tid}]>" if tid is not None else json.dumps(text)

    schema = {**schema, "x-guidance": JSON_DEFAULTS}  # compact JSON, as Grammar.json_schema
    source = (f'start: {literal(HERMES_OPEN)} "\\n" call "\\n" {literal(HERMES_CLOSE)}\n'
              f"call: %json {json.dumps(schema)}\n")
    return Grammar.lark(tokenizer, source)
