"""Test helper: ANEMLL's generation pipeline (embeddings -> FFN chunks -> LM head, one shared state)
run through the reference backend, written after ANEMLL chat.py's orchestration."""
from __future__ import annotations

import glob
import os
from typing import List, Tuple

import numpy as np

from anemll_fast.backends.reference import ReferenceBackend


class Pipeline:
    def __init__(self, model_dir: str, context: int, batch: int):
        d = str(model_dir)
        self.context, self.batch = context, batch
        self.embed = ReferenceBackend.load(_one(d, "*_embeddings*.ml*"))
        self.head = ReferenceBackend.load(_one(d, "*_lm_head*.ml*"))
        chunk_paths = sorted(glob.glob(os.path.join(d, "*_FFN_PF*_chunk_*of*.ml*")))
        assert chunk_paths, f"no FFN chunks in {d}"
        self.prefill_fns = [ReferenceBackend.load(p, "prefill") for p in chunk_paths]
        self.infer_fns = [m.function("infer") for m in self.prefill_fns]
        self.state = self.prefill_fns[0].make_state()  # one state object for every chunk and function
        self.mask = np.triu(np.full((context, context), -np.inf, dtype=np.float16), 1)

    def _chunks(self, fns, hidden, pos_ids, mask_rows, start):
        for fn in fns:
            out = fn.predict({"hidden_states": hidden, "position_ids": pos_ids,
                              "causal_mask": mask_rows[None, None], "current_pos": np.array([start], np.int32)},
                             self.state)
            hidden = out["output_hidden_states"]
        return hidden

    def infer(self, token: int, pos: int) -> np.ndarray:
        hidden = self.embed.predict({"input_ids": np.array([[token]], np.int32)})["hidden_states"]
        hidden = self._chunks(self.infer_fns, hidden, np.array([pos], np.int32), self.mask[pos:pos + 1], pos)
        out = self.head.predict({"hidden_states": hidden})
        parts = [out[k] for k in sorted((k for k in out if k.startswith("logits")), key=lambda k: int(k[6:]))]
        return np.concatenate(parts, axis=-1).reshape(-1)

    def prefill(self, tokens: List[int]) -> np.ndarray:
        """Batched prefill of all prompt tokens, then infer on the last position: its logits."""
        n, b = len(tokens), self.batch
        for start in range(0, n, b):
            chunk = tokens[start:start + b]
            ids = np.zeros((1, b), np.int32)
            ids[0, :len(chunk)] = chunk
            hidden = self.embed.predict({"input_ids": ids})["hidden_states"]
            pos = np.arange(start, start + b, dtype=np.int32)
            rows = self.mask[start:start + b] if start + b <= self.context else \
                np.pad(self.mask[start:], ((0, start + b - self.context), (0, 0)))
            self._chunks(self.prefill_fns, hidden, pos, rows, start)
        return self.infer(tokens[-1], n - 1)

    def greedy(self, prompt: List[int], steps: int) -> Tuple[List[int], List[np.ndarray]]:
        logits = self.prefill(prompt)
        toks, all_logits = [], [logits]
        pos = len(prompt)
        for i in range(steps):
            tok = int(np.argmax(logits))
            toks.append(tok)
            if i == steps - 1:
                break
            logits = self.infer(tok, pos)
            all_logits.append(logits)
            pos += 1
        return toks, all_logits


def _one(d: str, pattern: str) -> str:
    hits = sorted(glob.glob(os.path.join(d, pattern)))
    assert hits, f"nothing matches {pattern} in {d}"
    return hits[0]
