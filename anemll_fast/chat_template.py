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


def check_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Messages as plain dicts; each must have a known role and string content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise TemplateError("messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise TemplateError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise TemplateError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        check_text(content, f"messages[{i}].content", TemplateError)
        out.append(dict(message))
    return out


def render(
    template: Optional[str],
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: Optional[bool] = None,
    bos_token: Optional[str] = None,
    eos_token: Optional[str] = None,
    template_name: Optional[str] = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages`.

    `enable_thinking` is passed only when given, so that templates testing
    `enable_thinking is defined` behave as with transformers.
    """
    msgs = check_messages(messages)
    if template is None:
        raise TemplateError("the model has no chat template (tokenizer_config.json or chat_template.jinja)")
    variables: Dict[str, Any] = dict(extra)
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
