"""ChatSession: a conversation that keeps its KV cache between turns.

A new turn prefills only the tokens after the longest prefix the cache
already holds (ANEMLL's own runners prefill the whole history every turn).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Union

from anemll_fast.generate import GenerationResponse, settings_from, stream_tokens
from anemll_fast.sampling import SamplingSettings
from anemll_fast.tokenizer import check_text


class ChatSession:
    def __init__(self, model: Any, *, system: Optional[str] = None, enable_thinking: Optional[bool] = None,
                 context_shift: bool = False, settings: Optional[SamplingSettings] = None, **kwargs: Any) -> None:
        if system is not None:
            if not isinstance(system, str):
                raise ValueError(f"system: expected a string, got {type(system).__name__}")
            check_text(system, "system")  # refused now, not at every turn
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

    def prompt_ids(self, messages: Optional[List[Dict[str, Any]]] = None) -> List[int]:
        text = self.model.apply_chat_template(self.messages if messages is None else messages,
                                              enable_thinking=self.enable_thinking)
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    def _fitting_prompt_ids(self, settings: SamplingSettings) -> List[int]:
        """The prompt of the history; with context_shift, the oldest turns (never
        the system prompt nor the new message) are dropped until it fits."""
        ctx = self.model.context_length
        msgs = list(self.messages)  # turns are dropped only once the prompt fits
        ids = self.prompt_ids(msgs)
        if len(ids) <= ctx and not self.context_shift:
            return ids
        # Leave room for a reply (up to a quarter of the context) before shifting mid-reply.
        room = ctx - min(settings.max_tokens, ctx // 4)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        while len(ids) > (room if self.context_shift else ctx):
            if not self.context_shift:
                raise ValueError(
                    f"chat: the conversation ({len(ids)} tokens) no longer fits the context length {ctx}; "
                    "call reset() (/reset in the chat program) to start over, or use context_shift=True "
                    "to drop the oldest turns")
            last = len(msgs) - 1  # the new message
            if first >= last:  # nothing older left to drop
                if len(ids) <= ctx:
                    break  # the reply will shift the context as it goes
                raise ValueError(f"chat: the message alone ({len(ids)} tokens with the system prompt) does not "
                                 f"fit the context length {ctx}")
            # One turn: the oldest user message and every reply up to the next user message.
            end = first + 1
            while end < last and msgs[end]["role"] != "user":
                end += 1
            del msgs[first:end]
            ids = self.prompt_ids(msgs)
        self.messages[:] = msgs
        return ids

    def stream(self, content: str, **overrides: Any) -> Iterator[GenerationResponse]:
        """Send a user message; stream the reply. The reply joins the history at the end."""
        if not isinstance(content, str):
            raise ValueError(f"content: expected a string, got {type(content).__name__}")
        settings = self.settings if not overrides else settings_from(None, {**self.settings.__dict__, **overrides})
        self.messages.append({"role": "user", "content": content})
        try:
            ids = self._fitting_prompt_ids(settings)
        except Exception:
            self.messages.pop()
            raise
        reply: List[str] = []
        try:
            for response in stream_tokens(self.model, ids, settings, context_shift=self.context_shift):
                reply.append(response.text)
                yield response
        except (GeneratorExit, KeyboardInterrupt):
            # The caller stopped the reply (break, close, Ctrl-C): what was said stays.
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            raise
        except BaseException:
            self.messages.pop()  # a failed turn leaves no half message behind
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, content: str, **overrides: Any) -> str:
        return "".join(r.text for r in self.stream(content, **overrides))

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the conversation and the model's KV cache to `path`, so that a
        later `load` continues without prefilling the history again."""
        from anemll_fast.prompt_cache import save_prompt_cache

        session = {"system": self.system, "enable_thinking": self.enable_thinking, "messages": self.messages}
        save_prompt_cache(path, self.model, _extra={"session": session})

    def load(self, path: Union[str, "os.PathLike[str]"]) -> "ChatSession":
        """Continue the conversation saved in `path` (by the same model): its
        messages and KV cache replace this session's. Sampling settings stay."""
        from anemll_fast.chat_template import check_messages
        from anemll_fast.prompt_cache import PromptCacheError, read_prompt_cache, restore

        header, history, states = read_prompt_cache(path)
        session = header.get("session")
        if not isinstance(session, dict):
            raise PromptCacheError(f"{path}: a bare prompt cache, not a chat session (use load_prompt_cache)")
        try:
            messages = check_messages(session.get("messages") or []) if session.get("messages") else []
        except ValueError as exc:
            raise PromptCacheError(f"{path}: damaged session messages ({exc})") from None
        restore(path, self.model, header, history, states)
        self.system = session.get("system")
        self.enable_thinking = session.get("enable_thinking")
        self.messages = messages
        return self

    @property
    def last_prefill_tokens(self) -> int:
        return self.model.last_prefill_tokens
