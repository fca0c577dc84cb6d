"""Independent numpy float32 decoder (Llama / Qwen2 / Qwen3 / Gemma 3 text) with an explicit KV cache.

Written from the architectures' definitions (Hugging Face modeling code semantics), not from the converter's
MIL graphs, so that a mistake in the converter does not repeat itself here. Weights use Hugging Face names
and (out, in) layout; see anemll_fast.convert.weights.expected_shapes.

Gemma 3 (Hugging Face Gemma3ForCausalLM): embeddings times sqrt(hidden_size); RMSNorm gains are (1 + weight);
q and k RMS-normalized per head; queries scaled by query_pre_attn_scalar**-0.5; four norms per layer (input,
post-attention on the attention output, pre- and post-feedforward on the MLP); GELU-tanh gated MLP; sliding
layers attend to the last `sliding_window` positions (including their own) with RoPE base rope_local_base_freq,
full-attention layers to every earlier position with rope_theta (and its scaling).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


class ReferenceDecoder:
    """Greedy/teacher-forced decoding of one sequence, one position at a time or in blocks.

    arch_config: an anemll_fast.convert.ArchConfig, or a mapping with its field names
    (arch, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, rms_norm_eps, rope_theta,
    tie_word_embeddings, rope_scaling).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], arch_config: Any, max_len: int = 2048):
        self.arch = str(_get(arch_config, "arch"))
        if self.arch not in ("llama", "qwen2", "qwen3", "gemma3"):
            raise ValueError(f"reference decoder: unsupported architecture {self.arch!r}")
        self.gemma = self.arch == "gemma3"
        self.num_layers = int(_get(arch_config, "num_layers"))
        self.num_heads = int(_get(arch_config, "num_heads"))
        self.num_kv_heads = int(_get(arch_config, "num_kv_heads"))
        self.head_dim = int(_get(arch_config, "head_dim"))
        self.hidden_size = int(_get(arch_config, "hidden_size"))
        self.vocab_size = int(_get(arch_config, "vocab_size"))
        self.eps = float(_get(arch_config, "rms_norm_eps", 1e-6))
        self.max_len = int(max_len)
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        tied = bool(_get(arch_config, "tie_word_embeddings", True))
        self.lm_head = self.w["model.embed_tokens.weight"] if tied or "lm_head.weight" not in self.w \
            else self.w["lm_head.weight"]
        self.inv_freq = self._inv_freq(float(_get(arch_config, "rope_theta", 10000.0)),
                                       _get(arch_config, "rope_scaling"))
        self.layer_types = ["full_attention"] * self.num_layers
        self.window: Optional[int] = None
        self.q_scale = 1.0 / np.sqrt(self.head_dim)
        if self.gemma:
            self.layer_types = list(_get(arch_config, "layer_types"))
            self.window = int(_get(arch_config, "sliding_window"))
            self.local_inv_freq = self._inv_freq(float(_get(arch_config, "rope_local_theta")), None)
            self.q_scale = 1.0 / np.sqrt(float(_get(arch_config, "query_pre_attn_scalar")))
        self.reset()

    # ------------------------------------------------------------------ pieces of the architecture
    def _inv_freq(self, theta: float, scaling: Optional[Mapping]) -> np.ndarray:
        d = self.head_dim
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
            factor = scaling.get("factor", 8.0)
            lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
            old = scaling.get("original_max_position_embeddings", 8192)
            out = []
            for f in inv:
                wl = 2 * np.pi / f
                if wl < old / hi:
                    out.append(f)
                elif wl > old / lo:
                    out.append(f / factor)
                else:
                    s = (old / wl - lo) / (hi - lo)
                    out.append((1 - s) * f / factor + s * f)
            inv = np.array(out)
        elif scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            inv = inv / float(scaling.get("factor", 1.0))  # positions divided by the factor
        return inv

    def _rms(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        gain = 1.0 + g if self.gemma else g
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * gain

    def _rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: Optional[np.ndarray] = None) -> np.ndarray:
        # x: [heads, T, D]; rotate-half convention of the Hugging Face Llama/Qwen/Gemma code.
        inv_freq = self.inv_freq if inv_freq is None else inv_freq
        ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
        cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
        sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)
        half = self.head_dim // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def reset(self) -> None:
        """Empty the KV cache."""
        shape = (self.num_layers, self.num_kv_heads, self.max_len, self.head_dim)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)
        self.pos = 0

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Run tokens at positions pos..pos+T-1, append them to the cache; logits [T, vocab] (float32)."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            raise ValueError("reference decoder: no tokens given")
        if toks.min() < 0 or toks.max() >= self.vocab_size:
            raise ValueError(f"reference decoder: token id out of range [0, {self.vocab_size})")
        T, p0 = toks.size, self.pos
        if p0 + T > self.max_len:
            raise ValueError(f"reference decoder: {p0 + T} positions exceed max_len {self.max_len}")
        positions = np.arange(p0, p0 + T)
        nh, nkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.w["model.embed_tokens.weight"][toks]  # [T, H]
        if self.gemma:
            x = x * np.float32(np.sqrt(self.hidden_size))
        for i in range(self.num_layers):
            sliding = self.layer_types[i] == "sliding_attention"
            p = f"model.layers.{i}."
            h = self._rms(x, self.w[p + "input_layernorm.weight"])
            q = h @ self.w[p + "self_attn.q_proj.weight"].T
            k = h @ self.w[p + "self_attn.k_proj.weight"].T
            v = h @ self.w[p + "self_attn.v_proj.weight"].T
            if self.arch == "qwen2":
                q = q + self.w[p + "self_attn.q_proj.bias"]
                k = k + self.w[p + "self_attn.k_proj.bias"]
                v = v + self.w[p + "self_attn.v_proj.bias"]
            q = q.reshape(T, nh, D).transpose(1, 0, 2)
            k = k.reshape(T, nkv, D).transpose(1, 0, 2)
            v = v.reshape(T, nkv, D).transpose(1, 0, 2)
            if self.arch in ("qwen3", "gemma3"):
                q = self._rms(q, self.w[p + "self_attn.q_norm.weight"])
                k = self._rms(k, self.w[p + "self_attn.k_norm.weight"])
            inv = self.local_inv_freq if sliding else self.inv_freq
            q, k = self._rope(q, positions, inv), self._rope(k, positions, inv)
            self.k_cache[i, :, p0:p0 + T] = k
            self.v_cache[i, :, p0:p0 + T] = v
            keys = self.k_cache[i, :, :p0 + T]  # [nkv, S, D]
            vals = self.v_cache[i, :, :p0 + T]
            rep = nh // nkv
            keys = np.repeat(keys, rep, axis=0)  # head h uses kv head h // rep
            vals = np.repeat(vals, rep, axis=0)
            scores = (q * self.q_scale) @ keys.transpose(0, 2, 1)  # [nh, T, S]
            causal = positions[:, None] >= np.arange(p0 + T)[None, :]
            if sliding:  # the window holds the query's own position and the window - 1 before it
                causal &= np.arange(p0 + T)[None, :] > positions[:, None] - self.window
            scores = np.where(causal[None], scores, -np.inf)
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            attn = (probs @ vals).transpose(1, 0, 2).reshape(T, nh * D)
            attn = attn @ self.w[p + "self_attn.o_proj.weight"].T
            if self.gemma:
                x = x + self._rms(attn, self.w[p + "post_attention_layernorm.weight"])
                h = self._rms(x, self.w[p + "pre_feedforward_layernorm.weight"])
            else:
                x = x + attn
                h = self._rms(x, self.w[p + "post_attention_layernorm.weight"])
            gate = h @ self.w[p + "mlp.gate_proj.weight"].T
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            if self.gemma:  # GELU, tanh approximation
                act = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate ** 3)))
                x = x + self._rms((act * up) @ self.w[p + "mlp.down_proj.weight"].T,
                                  self.w[p + "post_feedforward_layernorm.weight"])
            else:
                x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w[p + "mlp.down_proj.weight"].T
        x = self._rms(x, self.w["model.norm.weight"])
        self.pos += T
        self.last_hidden = x
        return x @ self.lm_head.T

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Reset the cache, run the prompt; logits of its last position [vocab]."""
        self.reset()
        return self.forward(tokens)[-1]

    def step(self, token: int) -> np.ndarray:
        """Append one token; its logits [vocab]."""
        return self.forward([int(token)])[0]

    def greedy(self, prompt: Sequence[int], n: int, stop: Optional[Union[int, Sequence[int]]] = None) -> List[int]:
        """Greedy continuation of prompt: n new token ids (fewer if a stop id is produced, which is included)."""
        stops = set([stop] if isinstance(stop, int) else (stop or []))
        logits = self.prefill(prompt)
        out: List[int] = []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok in stops or len(out) == n:
                break
            logits = self.step(tok)
        return out
