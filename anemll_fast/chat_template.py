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

    try:
        return _compile(template).render(**variables)
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None
