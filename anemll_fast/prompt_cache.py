"""A model's KV cache saved to disk and read back (mlx-lm's save_prompt_cache /
load_prompt_cache), so that a long system prompt or document is prefilled once
across runs.

The engine owns one KV cache per model, so the "prompt cache" is the model's:
`save_prompt_cache(path, model)` writes the tokens the cache holds and every
state tensor (read through the backend: numpy on the reference backend,
MLState's buffer access on Core ML); `load_prompt_cache(path, model)` checks
that the file was made by the same model (its parts' contents and shapes) and
writes it back. The next generation then prefills only what follows the saved
tokens. A model with functions per context size (context switching) has one
set of states per size: all are saved, with the size that was active, and that
size is made active again on restore.

Format: a `.npz` archive (no pickles) with a JSON header, the history and one
array per state tensor, written to a temporary file and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from anemll_fast.errors import AnemllError

FORMAT = "anemll_fast.prompt_cache"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class PromptCacheError(AnemllError, ValueError):
    """The file is not a prompt cache, is damaged, or belongs to another model."""


def model_identity(model: Any) -> Dict[str, Any]:
    """What a saved cache must match: the contents of every part file (spec
    hashed whole, weights by size and their first and last 64 KiB) and the
    shapes. Paths and mtimes are left out, so a copied model still matches."""
    from anemll_fast.program_cache import content_fingerprint

    config = model.config
    parts = [config.embeddings] + list(config.ffn_infer) + list(config.ffn_prefill) + [config.lm_head]
    h = hashlib.sha256()
    seen = set()
    for comp in parts:
        path = str(config.path_of(comp))
        if path not in seen:
            seen.add(path)
            h.update(Path(path).name.encode() + b"\0" + content_fingerprint(path).encode() + b"\0")
    s = config.shapes
    return {
        "name": str(config.model_info.get("name") or (Path(str(config.model_dir)).name if config.model_dir else "")),
        "fingerprint": h.hexdigest(),
        "context_length": s.context_length,
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "states": [[name, dtype, list(shape)] for _i, name, dtype, shape in _engine(model).state_specs()],
    }


def save_prompt_cache(path: PathLike, model: Any, metadata: Optional[Mapping[str, str]] = None,
                      *, _extra: Optional[Dict[str, Any]] = None) -> None:
    """Write the model's KV cache (tokens held and state tensors) to `path`."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    header = {"format": FORMAT, "version": VERSION, "model": model_identity(model), "metadata": meta}
    if _extra:
        header.update(_extra)
    with _locked(model):
        engine = _engine(model)
        # A model with functions per context size has one set of states per size (all saved): the
        # active size's hold the cache, and restore makes it active again.
        header["active_context"] = int(engine.active_context)
        arrays = {"header": np.array(json.dumps(header)), "history": np.asarray(engine.history, dtype=np.int32)}
        for k, arr in enumerate(engine.read_states()):
            arrays[f"state_{k}"] = arr
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_prompt_cache(path: PathLike) -> Tuple[Dict[str, Any], np.ndarray, List[np.ndarray]]:
    """(header, history, state arrays) of a saved cache, checked for form only."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            names = set(z.files)
            if "header" not in names or "history" not in names:
                raise PromptCacheError(f"{p}: not an anemll_fast prompt cache (no header)")
            header = json.loads(str(z["header"]))
            history = np.asarray(z["history"])
            states = [np.asarray(z[f"state_{k}"]) for k in range(sum(n.startswith("state_") for n in names))]
    except PromptCacheError:
        raise
    except FileNotFoundError:
        raise PromptCacheError(f"{p}: no such file") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise PromptCacheError(f"{p}: not a readable prompt cache ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PromptCacheError(f"{p}: not an anemll_fast prompt cache")
    if header.get("version") != VERSION:
        raise PromptCacheError(f"{p}: prompt cache format version {header.get('version')!r}; "
                               f"this anemll_fast reads version {VERSION}")
    if history.ndim != 1 or history.dtype.kind not in "iu":
        raise PromptCacheError(f"{p}: damaged (history is not a list of token ids)")
    return header, history, states


def load_prompt_cache(path: PathLike, model: Any, return_metadata: bool = False) -> Any:
    """Restore the KV cache saved in `path` into `model` (made by the same model).

    Returns the user metadata when `return_metadata`, else None.
    """
    header, history, states = read_prompt_cache(path)
    restore(path, model, header, history, states)
    return header.get("metadata", {}) if return_metadata else None


def restore(path: PathLike, model: Any, header: Dict[str, Any], history: np.ndarray,
            states: List[np.ndarray]) -> None:
    saved = header.get("model") or {}
    here = model_identity(model)
    for key, what in (("context_length", "context length"), ("vocab_size", "vocabulary"),
                      ("hidden_size", "hidden size"), ("states", "KV-cache states")):
        if saved.get(key) != here[key]:
            raise PromptCacheError(f"{path}: saved from a model with {what} {saved.get(key)}, "
                                   f"but this model has {here[key]} (saved from {saved.get('name')!r})")
    if saved.get("fingerprint") != here["fingerprint"]:
        raise PromptCacheError(f"{path}: saved from another model ({saved.get('name')!r}: its part files differ "
                               f"from those of {here['name']!r}); a KV cache only fits the model that made it")
    active = header.get("active_context")
    if active is not None and (isinstance(active, bool) or not isinstance(active, int)):
        raise PromptCacheError(f"{path}: damaged (active_context {active!r} is not a context size)")
    with _locked(model):
        if active is None and getattr(model.config, "context_functions", None):
            raise PromptCacheError(f"{path}: saved without its active context size, which this model (one set "
                                   f"of states per context size) needs; save it again with this version")
        try:
            _engine(model).write_states(states, history.astype(np.int64), active_context=active)
        except (AnemllError, ValueError) as exc:
            raise PromptCacheError(f"{path}: cannot restore: {exc}") from None
        finally:
            if hasattr(model, "owner"):
                model.owner = None  # the cache holds no running generation's tokens now


def _locked(model: Any) -> Any:
    import contextlib

    lock = getattr(model, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def _engine(model: Any) -> Any:
    live = getattr(model, "live_engine", None)
    if callable(live):
        return live()  # raises the model's own error once closed
    engine = getattr(model, "engine", None)
    if engine is None:
        raise ValueError("model: closed")
    return engine
