"""Optional external baselines on the same weights: PyTorch eager float32 (a plain Llama written from the
architecture over the GGUF's dequantized weights) and llama.cpp (llama-cpp-python on the GGUF itself).

Each runs only when its package imports. Interface: `available(gguf_path)` gives {name: side}, where a side
has `prefill(prompt) -> first token` and `decode(first, start, n) -> tokens` (greedy, one thread).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np


class TorchSide:
    """PyTorch eager float32 Llama (RMSNorm, rotary half-split, GQA, SwiGLU) with a KV cache."""

    def __init__(self, weights: Dict[str, np.ndarray], cfg: Any, max_len: int = 512):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        # Writable float32 arrays (torch refuses read-only ones; memory-mapped weights are read-only).
        self.w = {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in weights.items()}
        self.cfg = cfg
        self.L, self.nh, self.nkv, self.D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.D, 2, dtype=torch.float64) / self.D))
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.k = torch.zeros(self.L, self.nkv, max_len, self.D)
        self.v = torch.zeros(self.L, self.nkv, max_len, self.D)
        self.pos = 0

    def _rms(self, x: Any, g: Any) -> Any:
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g

    def _rope(self, x: Any, pos: Any) -> Any:
        half = self.D // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos] + rot * self.sin[pos]

    def forward(self, toks: List[int]) -> Any:
        torch, w = self.torch, self.w
        with torch.inference_mode():
            T, p0 = len(toks), self.pos
            pos = torch.arange(p0, p0 + T)
            x = w["model.embed_tokens.weight"][torch.tensor(toks)]
            for i in range(self.L):
                p = f"model.layers.{i}."
                h = self._rms(x, w[p + "input_layernorm.weight"])
                q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, self.nh, self.D).transpose(0, 1)
                k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, self.nkv, self.D).transpose(0, 1)
                v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, self.nkv, self.D).transpose(0, 1)
                q, k = self._rope(q, pos), self._rope(k, pos)
                self.k[i, :, p0:p0 + T], self.v[i, :, p0:p0 + T] = k, v
                rep = self.nh // self.nkv
                keys = self.k[i, :, :p0 + T].repeat_interleave(rep, 0)
                vals = self.v[i, :, :p0 + T].repeat_interleave(rep, 0)
                s = q @ keys.transpose(1, 2) / self.D ** 0.5
                s = s.masked_fill(pos[:, None] < torch.arange(p0 + T)[None], float("-inf"))
                a = (s.softmax(-1) @ vals).transpose(0, 1).reshape(T, self.nh * self.D)
                x = x + a @ w[p + "self_attn.o_proj.weight"].T
                h = self._rms(x, w[p + "post_attention_layernorm.weight"])
                g = h @ w[p + "mlp.gate_proj.weight"].T
                x = x + (torch.nn.functional.silu(g) * (h @ w[p + "mlp.up_proj.weight"].T)) \
                    @ w[p + "mlp.down_proj.weight"].T
            self.pos += T
            return self._rms(x[-1:], w["model.norm.weight"]) @ self.head.T

    def prefill(self, prompt: List[int]) -> int:
        self.pos = 0
        return int(self.forward(prompt).argmax())

    def decode(self, first: int, start: int, n: int) -> List[int]:
        self.pos, out, tok = start, [], first
        for _ in range(n):
            tok = int(self.forward([tok]).argmax())
            out.append(tok)
        return out


class LlamaCppSide:
    """llama.cpp through llama-cpp-python on the GGUF, one thread (prompt batches included)."""

    def __init__(self, path: str, n_ctx: int = 512):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, n_batch=64,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        # llama-cpp-python (0.3.x) keeps `scores` only with logits_all, which would cost the prefill a head over
        # every prompt row: read the last position's logits from the context instead.
        row = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))

    def prefill(self, prompt: List[int]) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        return self._next()

    def decode(self, first: int, start: int, n: int) -> List[int]:
        out, tok = [], first
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._next()
            out.append(tok)
        return out


def available(gguf: Path) -> Dict[str, Any]:
    """The baselines whose packages import, built over `gguf`; {} when none does."""
    sides: Dict[str, Any] = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        from anemll_fast.convert.gguf_source import load_gguf

        src = load_gguf(Path(gguf))
        sides["torch fp32"] = TorchSide(src.weights, src.config)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pass
    else:
        sides["llama.cpp"] = LlamaCppSide(str(gguf))
    return sides
