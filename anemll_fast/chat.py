"""ChatSession: a conversation that keeps its KV cache between turns.

A new turn prefills only the tokens after the longest prefix the cache
already holds (ANEMLL's own runners prefill the whole history every turn).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

from anemll_fast.generate import GenerationResponse, settings_from, stream_tokens
from anemll_fast.sampling import SamplingSettings


class ChatSession:
    def __init__(self, model: Any, *, system: Optional[str] = None, enable_thinking: Optional[bool] = None,
                 context_shift: bool = False, settings: Optional[SamplingSettings] = None, **kwargs: Any) -> None:
        self.model = model
        self.system = system
        self.enable_thinking = enable_thinking
        self.context_shift = context_shift
        self.settings = settings_from(settings, kwargs)
        self.messages: List[Dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> List[int]:
        text = self.model.apply_chat_template(self.messages, enable_thinking=self.enable_thinking)
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, content: str, **overrides: Any) -> Iterator[GenerationResponse]:
        """Send a user message; stream the reply. The reply joins the history at the end."""
        if not isinstance(content, str):
            raise ValueError(f"content: expected a string, got {type(content).__name__}")
        settings = self.settings if not overrides else settings_from(None, {**self.settings.__dict__, **overrides})
        self.messages.append({"role": "user", "content": content})
        try:
            ids = self.prompt_ids()
        except Exception:
            self.messages.pop()
            raise
        reply: List[str] = []
        try:
            for response in stream_tokens(self.model, ids, settings, context_shift=self.context_shift):
                reply.append(response.text)
                yield response
        except BaseException:
            self.messages.pop()  # a failed turn leaves no half message behind
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, content: str, **overrides: Any) -> str:
        return "".join(r.text for r in self.stream(content, **overrides))

    @property
    def last_prefill_tokens(self) -> int:
        return self.model.last_prefill_tokens
