"""Chat templates: the model's own jinja2 template, rendered as transformers does."""
from __future__ import annotations

import datetime
import json
import math
import re
import threading
import time
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence

from anemll_fast.errors import AnemllError
from anemll_fast.tokenizer import check_text

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(AnemllError, ValueError):
    """The chat template or the messages given to it are unusable."""


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


# Bounds of one rendering: a template comes with a downloaded model and may
# loop, recurse or grow strings without end.
RENDER_TIMEOUT = 5.0  # seconds
MAX_TEXT = 4_000_000  # characters of any string (or items of a list) it builds, and of the prompt


class _Limits(threading.local):
    deadline = math.inf


_limits = _Limits()


def _check_deadline() -> None:
    if time.monotonic() > _limits.deadline:
        raise _BoundError(f"rendering takes more than {RENDER_TIMEOUT:g} s (an endless loop?)")


class _BoundError(Exception):
    """A rendering bound was hit (turned into TemplateError naming the template)."""


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, bytes)) and len(value) > MAX_TEXT:
        raise _BoundError(f"it builds a {type(value).__name__} of {len(value):,} items (limit {MAX_TEXT:,})")
    return value


def _check_widths(fmt: str) -> None:
    """A format string whose field width or precision alone passes the size limit."""
    for number in re.findall(r"\d{7,}", fmt):
        if int(number) > MAX_TEXT:
            raise _BoundError(f"a format width of {number} (limit {MAX_TEXT:,})")


def _environment() -> Any:
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: checked like `+`
            self.write("environment.checked(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, plus a deadline and a size limit on what templates build.
        jinja2's sandbox bounds range() but not time, recursion or string growth."""

        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        @staticmethod
        def checked(value: Any) -> Any:
            _check_deadline()
            return _check_size(value)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_deadline()
            if operator == "*" and isinstance(right, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                    and len(left) * right > MAX_TEXT:  # refused before it is built
                raise _BoundError(f"it builds a {type(left).__name__} of {len(left) * right:,} items "
                                  f"(limit {MAX_TEXT:,})")
            if operator == "%" and isinstance(left, str):
                _check_widths(left)
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 \
                    and isinstance(left, int) and abs(left) > 1:
                raise _BoundError(f"{left} ** {right} is too large")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_deadline()
            # str.ljust/center/zfill/format... with a huge width build huge strings.
            if any(isinstance(a, int) and not isinstance(a, bool) and a > MAX_TEXT
                   for a in (*args, *kwargs.values())):
                raise _BoundError(f"a call with an argument above {MAX_TEXT:,}")
            return _check_size(super().call(context, obj, *args, **kwargs))

        def getattr(self, obj: Any, attribute: str) -> Any:
            _check_deadline()
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_widths(obj)
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _check_deadline()
            if isinstance(obj, str) and argument in ("format", "format_map"):
                _check_widths(obj)
            return super().getitem(obj, argument)

    return BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _bounded_range(*args: int) -> Any:
    from jinja2.sandbox import safe_range

    for i in safe_range(*args):
        _check_deadline()
        yield i


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2 import TemplateSyntaxError

    # Sandboxed: a template comes with a downloaded model and is untrusted.
    env = _environment()
    env.globals["range"] = _bounded_range
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from None


def _text_content(content: Any, where: str) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are understood."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise TemplateError(f"{where}[{j}] must be a content part object, got {type(part).__name__}")
            kind = part.get("type")
            if kind not in ("text", "input_text"):
                raise TemplateError(f"{where}[{j}].type: only text parts are supported (this model takes "
                                    f"text only), got {kind!r}")
            text = part.get("text")
            if not isinstance(text, str):
                raise TemplateError(f"{where}[{j}].text must be a string, got {type(text).__name__}")
            texts.append(text)
        # Parts are one message: joined as OpenAI does, without separators.
        return "".join(texts)
    raise TemplateError(f"{where} must be a string or a list of content parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> Dict[str, Any]:
    """An assistant's tool call as templates expect it: arguments as a dict when they are JSON."""
    if not isinstance(call, Mapping):
        raise TemplateError(f"{where} must be an object, got {type(call).__name__}")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise TemplateError(f"{where}.function must be an object with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{where}.function.name must be a non-empty string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI sends arguments as a JSON string; templates (Llama 3, Qwen 2.5) render
        # them with `tojson`, which would quote the string a second time.
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = arguments
        arguments = parsed
    out = dict(call)
    out["type"] = call.get("type", "function")
    out["function"] = {**function, "arguments": arguments}
    return out


def check_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Messages as plain dicts that every template can render.

    Accepts OpenAI's chat messages: content as a string, a list of text parts,
    or None on an assistant message with `tool_calls`; `tool` messages with
    `tool_call_id`; the `developer` role (rendered as `system`).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise TemplateError("messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise TemplateError(f"messages[{i}].role must be one of {ROLES + ('developer',)}, got {role!r}")
        msg = {k: v for k, v in message.items() if v is not None}
        msg["role"] = role
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise TemplateError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
            if isinstance(tool_calls, (str, bytes)) or not isinstance(tool_calls, Sequence):
                raise TemplateError(f"messages[{i}].tool_calls must be a list")
            msg["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(tool_calls)]
        content = message.get("content")
        if content is None and tool_calls:
            msg["content"] = ""  # templates concatenate content: None would break them
        else:
            msg["content"] = _text_content(content, f"messages[{i}].content")
            check_text(msg["content"], f"messages[{i}].content", TemplateError)
        out.append(msg)
    return out


def check_tools(tools: Any) -> List[Dict[str, Any]]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise TemplateError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise TemplateError(f"tools[{i}] must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise TemplateError(f"tools[{i}].function.name must be a non-empty string")
        params = function.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise TemplateError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": dict(function)})
    return out


def supports_tools(template: Optional[str]) -> bool:
    """Whether a chat template renders `tools` itself."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """Tool instructions for a model whose template knows no tools: the Hermes
    format (as Qwen's templates write it), which tool_calls.parse reads back."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render(
    template: Optional[str],
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: Optional[bool] = None,
    bos_token: Optional[str] = None,
    eos_token: Optional[str] = None,
    template_name: Optional[str] = None,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages` (OpenAI chat messages, see check_messages).

    `enable_thinking` is passed only when given, so that templates testing
    `enable_thinking is defined` behave as with transformers. `tools` (OpenAI's
    function tools) go to the template; a template that knows no tools gets
    them as a system message in the Hermes format instead. Other keywords are
    template variables.
    """
    msgs = check_messages(messages)
    if template is None:
        raise TemplateError("the model has no chat template (tokenizer_config.json or chat_template.jinja)")
    variables: Dict[str, Any] = dict(extra)
    if tools:
        tool_list = check_tools(tools)
        if supports_tools(template):
            variables["tools"] = tool_list
        else:
            prompt = tools_system_prompt(tool_list)
            if msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{prompt}"}
            else:
                msgs.insert(0, {"role": "system", "content": prompt})
    variables.update(
        messages=msgs,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
    if enable_thinking is not None:
        variables["enable_thinking"] = bool(enable_thinking)
    from jinja2 import TemplateError as JinjaError

    compiled = _compile(template)
    name = template_name or _name(template)
    _limits.deadline = time.monotonic() + RENDER_TIMEOUT  # read at call time: tests lower it
    try:
        pieces = []
        total = 0
        for piece in compiled.generate(**variables):
            total += len(piece)
            if total > MAX_TEXT:
                raise _BoundError(f"its output passes {MAX_TEXT:,} characters")
            _check_deadline()
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError:
        raise
    except _BoundError as exc:
        raise TemplateError(f"chat template {name}: stopped: {exc}") from None
    except RecursionError:
        raise TemplateError(f"chat template {name}: recursion too deep") from None
    except MemoryError:
        raise TemplateError(f"chat template {name}: out of memory") from None
    except JinjaError as exc:
        raise TemplateError(f"chat template {name} failed: {exc}") from None
    finally:
        _limits.deadline = math.inf


def _name(template: str) -> str:
    """How a message names a template without a file: its first line, shortened."""
    first = template.strip().splitlines()[0] if template.strip() else ""
    return repr(first[:60] + ("..." if len(first) > 60 else ""))
