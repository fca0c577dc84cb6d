"""Request bodies of the OpenAI API, as pydantic models (they also make the OpenAPI schema).

Types are strict (a number sent as a string is a 400, not a guess); unknown
fields are ignored, as clients send many optional ones (`store`, `metadata`...).
Ranges follow OpenAI's documentation; llama.cpp-style extras (top_k, min_p,
repetition_penalty) are accepted too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
_U64 = (1 << 64) - 1


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(_Body):
    name: str = Field(min_length=1)


class ToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class JsonSchemaFormat(_Body):
    name: str = Field("response", min_length=1, max_length=64)
    description: Optional[str] = None
    json_schema: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format.json_schema: required when type is 'json_schema'")
            out["json_schema"] = {"name": self.json_schema.name, "strict": self.json_schema.strict,
                                  "schema": self.json_schema.json_schema or {"type": "object"}}
        return out


class ContentPart(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class FunctionCall(_Body):
    name: str
    arguments: Union[str, Dict[str, Any]] = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=(1 << 31) - 1)  # the native sampler's int32
    min_p: Optional[float] = Field(None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=-(1 << 63), le=_U64)
    stop: Union[str, List[str], None] = None
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored, as the issue asks
    response_format: Optional[ResponseFormat] = None
    # llama.cpp's extension: false prefills the whole prompt even when the KV cache holds
    # its start. A prompt split differently into batches can differ in the last fp16 bit
    # of the logits, so only uncached runs reproduce bit for bit whatever came before.
    cache_prompt: bool = True

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (digits), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Union[str, List[str], None]) -> Union[str, List[str], None]:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return value


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # Extra variables for the chat template (e.g. Qwen3's enable_thinking), as vLLM accepts them.
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str]] = Field(...)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=128)
