"""The model's tokenizer: `tokenizers` plus what tokenizer_config.json and
generation_config.json say (special tokens, end-of-turn ids, chat template)."""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

import numpy as np

from anemll_fast.errors import AnemllError
from anemll_fast.text_files import read_utf8


class TokenizerError(AnemllError, ValueError):
    """The tokenizer files are missing or unusable, or an id is out of range."""


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def check_text(text: str, what: str = "text", error: Optional[type] = None) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, e.g. from
    undecodable bytes read with errors="surrogateescape"): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise (error or TokenizerError)(
            f"{what}: character {exc.start} is a lone surrogate U+{ord(bad):04X}, not valid Unicode "
            "(undecodable bytes? the input must be UTF-8)") from None


def _token_text(value: Any) -> Optional[str]:
    """Special tokens are strings or {"content": ...} objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode, decode and describe end-of-turn tokens for one model."""

    def __init__(self, directory: Union[str, Path]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{self.directory}: no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"{path}: cannot load tokenizer ({exc})") from None
        cfg_path = self.directory / "tokenizer_config.json"
        self.config: Dict[str, Any] = _read_json(cfg_path) if cfg_path.is_file() else {}
        gen_path = self.directory / "generation_config.json"
        self.generation_config: Dict[str, Any] = _read_json(gen_path) if gen_path.is_file() else {}
        self.chat_template: Optional[str] = self._find_chat_template()
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.eos_token_ids: Set[int] = self._end_ids()

    # ------------------------------------------------------------ metadata
    def _find_chat_template(self) -> Optional[str]:
        jinja = self.directory / "chat_template.jinja"
        self.chat_template_source = str(jinja)  # where the template comes from, for messages
        if jinja.is_file():
            return read_utf8(jinja, TokenizerError)
        self.chat_template_source = str(self.directory / "tokenizer_config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    def _end_ids(self) -> Set[int]:
        ids: Set[int] = set()
        gen_eos = self.generation_config.get("eos_token_id")
        for value in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(value, int):
                ids.add(value)
        for text in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>"):
            if text is None:
                continue
            tid = self._tok.token_to_id(text)
            if tid is not None and (text == self.eos_token or self._is_special(tid)):
                ids.add(tid)
        return ids

    def _is_special(self, token_id: int) -> bool:
        decoder = self.config.get("added_tokens_decoder") or {}
        entry = decoder.get(str(token_id))
        if isinstance(entry, dict):
            return bool(entry.get("special", False))
        added = self._tok.get_added_tokens_decoder().get(token_id)
        return bool(added is not None and added.special)

    @property
    def eos_token_id(self) -> Optional[int]:
        """The id of the EOS token (mlx-lm / transformers); every id that ends
        a turn is in `eos_token_ids`."""
        if self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                return tid
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._tok.token_to_id(self.bos_token) if self.bos_token is not None else None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, *, enable_thinking: Optional[bool] = None,
                            **template_kwargs: Any) -> Union[str, List[int]]:
        """The model's chat template applied to `messages`, as transformers does:
        the ids (tokenize=True, the default there too) or the text. Extra
        keywords (e.g. Qwen3's enable_thinking) become template variables."""
        from anemll_fast.chat_template import render

        template_kwargs.setdefault("template_name", getattr(self, "chat_template_source", None))
        text = render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      enable_thinking=enable_thinking, bos_token=self.bos_token, eos_token=self.eos_token,
                      **template_kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # --------------------------------------------------------------- coding
    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Ids of `text`; a BOS is prepended when the model asks for one."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_text(text)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token is not None:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.check_ids(ids)
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids` (byte-level BPE can split a character)."""
        return self.decode(ids, skip_special_tokens=False).encode("utf-8", "surrogatepass")

    def to_json(self) -> str:
        """The tokenizer.json text (for libraries that build their own view, e.g. llguidance)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(token_id)

    def check_ids(self, ids: Iterable[int]) -> None:
        n = self.vocab_size
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, (bool, np.bool_)) or i < 0 or i >= n:
                raise TokenizerError(f"token id {i!r} is outside the vocabulary (0..{n - 1})")

    def is_end_of_turn(self, token_id: int) -> bool:
        return token_id in self.eos_token_ids
