"""Architecture description of the decoders the converter supports (Llama, Qwen2/2.5, Qwen3, Gemma 3 text)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from anemll_fast.convert.errors import ConvertError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")

# Hugging Face `model_type` / `architectures` spellings mapped onto our three families.
_MODEL_TYPES = {
    "llama": "llama",
    "llamaforcausallm": "llama",
    "qwen2": "qwen2",
    "qwen2forcausallm": "qwen2",
    "qwen2.5": "qwen2",
    "qwen3": "qwen3",
    "qwen3forcausallm": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gemma3forcausallm": "gemma3",
}


def normalize_arch(name: str) -> str:
    """Map an architecture name ('llama', 'Qwen2ForCausalLM', ...) to one of SUPPORTED_ARCHS."""
    key = str(name).strip().lower()
    if key not in _MODEL_TYPES:
        raise ConvertError(
            f"unsupported architecture {name!r}: the converter supports {', '.join(SUPPORTED_ARCHS)}"
        )
    return _MODEL_TYPES[key]


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Shapes and hyper-parameters of one decoder-only transformer."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    rope_scaling: Optional[Dict[str, Any]] = None
    name: str = "model"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # Gemma 3: per-layer attention kind, window of the sliding layers, RoPE base of the sliding layers
    # (rope_theta is the global layers'), and the query scale 1/sqrt(query_pre_attn_scalar).
    layer_types: Optional[Tuple[str, ...]] = None
    sliding_window: Optional[int] = None
    rope_local_theta: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", normalize_arch(self.arch))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.arch == "gemma3":
            self._check_gemma3()
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConvertError(f"config field {field!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConvertError(
                f"config field 'num_attention_heads' ({self.num_heads}) is not a multiple of "
                f"'num_key_value_heads' ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConvertError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConvertError(f"config field 'rms_norm_eps' must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConvertError(f"config field 'rope_theta' must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default", None):
                raise ConvertError(
                    f"config field 'rope_scaling' has unsupported type {kind!r} (supported: llama3, linear)"
                )

    def _check_gemma3(self) -> None:
        types = self.layer_types
        if types is None or len(types) != self.num_layers:
            raise ConvertError(f"config field 'layer_types' must list {self.num_layers} layer kinds, got {types!r}")
        bad = [t for t in types if t not in GEMMA3_LAYER_TYPES]
        if bad:
            raise ConvertError(f"config field 'layer_types' holds {bad[0]!r} (known: {', '.join(GEMMA3_LAYER_TYPES)})")
        for field in ("sliding_window", "rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ConvertError(f"config field {field!r} must be positive, got {value!r}")

    @property
    def is_gemma3(self) -> bool:
        return self.arch == "gemma3"

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends over a sliding window (Gemma 3 local layers)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def layer_theta(self, layer: int) -> float:
        """RoPE base of `layer`: Gemma 3's sliding layers use their own."""
        return float(self.rope_local_theta) if self.is_sliding(layer) else self.rope_theta

    @property
    def qkv_bias(self) -> bool:
        """Qwen2/2.5 carry biases on q/k/v projections."""
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and Gemma 3 RMS-normalize each head of q and k before RoPE."""
        return self.arch in ("qwen3", "gemma3")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArchConfig":
        """Build from our own field names (as written by to_dict) or from a Hugging Face config.json dict."""
        if "num_layers" in data and "arch" in data:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = set(data) - fields
            if unknown:
                raise ConvertError(f"unknown config field(s): {', '.join(sorted(unknown))}")
            return cls(**dict(data))
        return cls.from_hf_config(data)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], arch: Optional[str] = None) -> "ArchConfig":
        """Read a Hugging Face config.json dict (or a random-model spec using the same keys)."""
        if arch is None:
            arch = cfg.get("model_type") or cfg.get("arch") or cfg.get("architecture")
            if arch is None and cfg.get("architectures"):
                arch = cfg["architectures"][0]
            if arch is None:
                raise ConvertError("config has no 'model_type' (or 'architectures'): cannot tell the architecture")
        arch = normalize_arch(arch)

        def need(key: str, *alts: str) -> Any:
            for k in (key,) + alts:
                if k in cfg and cfg[k] is not None:
                    return cfg[k]
            raise ConvertError(f"config is missing required field {key!r}")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConvertError(
                    f"config field 'hidden_size' ({hidden}) is not divisible by 'num_attention_heads' ({heads})"
                )
            head_dim = hidden // heads
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        default_eps = 1e-5 if arch == "llama" else 1e-6
        gemma: Dict[str, Any] = {}
        if arch == "gemma3":
            layers = int(need("num_hidden_layers", "num_layers"))
            types = cfg.get("layer_types")
            if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
                pattern = int(cfg.get("sliding_window_pattern", 6))
                types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
            gemma = {
                "layer_types": tuple(types),
                "sliding_window": int(cfg.get("sliding_window", 512)),
                "rope_local_theta": float(cfg.get("rope_local_base_freq", 10000.0)),
                "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", head_dim)),
            }
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers", "num_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", default_eps)),
            rope_theta=float(cfg.get("rope_theta", 1000000.0 if arch == "gemma3" else 10000.0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch != "llama")),
            **gemma,
            rope_scaling=dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None,
            name=str(cfg.get("name", cfg.get("_name_or_path", "model")) or "model").rstrip("/").split("/")[-1],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )


def load_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a JSON config, naming the file on failure."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConvertError(f"config file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"config file {path} must hold a JSON object")
    return data
