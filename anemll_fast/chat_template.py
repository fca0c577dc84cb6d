"""Chat templates: the model's own jinja2 template, rendered as transformers does."""
from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence

from anemll_fast.errors import AnemllError

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(AnemllError, ValueError):
    """The chat template or the messages given to it are unusable."""


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed: a template comes with a downloaded model and is untrusted.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
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

    try:
        return _compile(template).render(**variables)
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None
