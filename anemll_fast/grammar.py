"""Structured output: a grammar that masks every decode step inside the native sampler.

The grammar engine is llguidance, chosen over xgrammar by measurement on this
project's machine (Python 3.11, Linux x86_64, 2026-11): `pip install llguidance`
is one 3 MB wheel with no dependencies, builds the Qwen3 tokenizer (151,669
tokens) in ~1.0 s and computes a JSON-schema mask in 0.05-1.3 ms per token;
`xgrammar` 0.2.9 requires torch, transformers and triton (gigabytes) and its
import fails without torch. See benchmarks/bench_grammar.py for the cost per token.

Per step, Python does only the matcher's own work: llguidance writes the
allowed-token bitmask straight into a buffer the native sampler reads in place
(`Engine.set_token_mask`), then is told the token the sampler chose.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

import numpy as np

from anemll_fast.errors import AnemllError

# Compact JSON with the separators json.dumps and most models use: free
# whitespace would let a model pad forever without breaking the grammar.
JSON_DEFAULTS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(AnemllError, ValueError):
    """A grammar or response_format is unusable, or generation left the grammar."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - llguidance is a dependency of the [server] extra
        raise GrammarError("structured output needs llguidance: pip install 'anemll_fast[server]'") from None
    return llguidance


def ll_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of an anemll_fast Tokenizer, built once per tokenizer (~1 s at 150k tokens)."""
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is not None:
        return cached
    llg = _llguidance()
    eos = sorted(tokenizer.eos_token_ids)
    if not eos:
        raise GrammarError(f"{tokenizer.directory}: the tokenizer names no end-of-turn token, "
                           "so a grammar could never end the generation")
    try:
        lt = llg.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=eos)
    except Exception as exc:  # the Rust side raises plain exceptions
        raise GrammarError(f"{tokenizer.directory}: llguidance cannot use this tokenizer ({exc})") from None
    tokenizer._llguidance = lt
    return lt


class Grammar:
    """One generation's grammar state: fill_mask() before each step, accept(token) after it."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        llg = _llguidance()
        lt = ll_tokenizer(tokenizer)
        self._matcher = llg.LLMatcher(lt, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"grammar: {self._matcher.get_error()}")
        self.n_bits = int(lt.vocab_size)
        self.mask = np.full((self.n_bits + 31) // 32, -1, dtype=np.int32)

    # ------------------------------------------------------------ builders
    @classmethod
    def json_schema(cls, tokenizer: Any, schema: Mapping[str, Any], *, strict: bool = True) -> "Grammar":
        """Output that parses as JSON and validates against `schema` (non-strict: unsupported
        keywords are ignored instead of refused)."""
        if not isinstance(schema, Mapping):
            raise GrammarError(f"json_schema: the schema must be a JSON object, got {type(schema).__name__}")
        llg = _llguidance()
        options: Dict[str, Any] = dict(JSON_DEFAULTS)
        if not strict:
            options["lenient"] = True
        try:
            text = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"json_schema: {exc}") from None
        error = llg.LLMatcher.validate_grammar(text, ll_tokenizer(tokenizer))
        if error:
            raise GrammarError(f"json_schema: unsupported or invalid schema: {error}")
        return cls(tokenizer, text)

    @classmethod
    def json_object(cls, tokenizer: Any) -> "Grammar":
        """Any JSON object."""
        return cls.json_schema(tokenizer, {"type": "object"})

    @classmethod
    def lark(cls, tokenizer: Any, source: str) -> "Grammar":
        """A Lark grammar (llguidance's dialect: `%json {...}` embeds a JSON schema)."""
        llg = _llguidance()
        text = llg.LLMatcher.grammar_from_lark(source)
        error = llg.LLMatcher.validate_grammar(text, ll_tokenizer(tokenizer))
        if error:
            raise GrammarError(f"lark grammar: {error}")
        return cls(tokenizer, text)

    @classmethod
    def from_response_format(cls, tokenizer: Any, response_format: Optional[Mapping[str, Any]]) -> Optional["Grammar"]:
        """OpenAI's `response_format`: {"type": "text"} (None), {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise GrammarError("response_format: expected an object with a 'type'")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(tokenizer)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise GrammarError("response_format.json_schema: expected an object with 'name' and 'schema'")
            schema = spec.get("schema", {"type": "object"})
            strict = spec.get("strict")
            return cls.json_schema(tokenizer, schema, strict=True if strict is None else bool(strict))
        raise GrammarError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}")

    # ----------------------------------------------------------- per step
    def fill_mask(self) -> None:
        """Write the tokens allowed next into `mask` (the native sampler reads it in place)."""
        self._matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        if self._matcher.is_error():
            raise GrammarError(f"grammar: {self._matcher.get_error()}")

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"grammar: token {token} was not allowed ({self._matcher.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end-of-turn token may follow."""
        return bool(self._matcher.is_accepting())

    def allowed(self, token: int) -> bool:
        """Whether `token` is allowed by the last fill_mask()."""
        return token < self.n_bits and bool((int(self.mask[token >> 5]) >> (token & 31)) & 1)
