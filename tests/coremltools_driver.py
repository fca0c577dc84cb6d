"""A generation loop written only against coremltools' API, driving an ANEMLL-layout model the way
ANEMLL's chat.py does (written for these tests, not a copy of it): parts found from meta.yaml
(.mlmodelc first, then .mlpackage), each chunk opened once per function with construction probed in
try/except, metadata read from the model, prefill in full batches with causal-mask row slices, then
one token at a time through `infer`, one state shared by every chunk and function, logits parts
concatenated, greedy choice.

    python coremltools_driver.py MODEL_DIR --prompt-ids 1,2,3 --max-tokens 8 [--fp32-inputs]

prints the generated token ids as JSON on its last line (with --stats, an object that also holds
load, prefill and decode seconds). Run it with plain `python` (coremltools) or with
`python -m anemll_fast.coreml_compat`; benchmarks/bench_coreml_compat.py times both.
"""
import argparse
import json
import os
import re
import sys
import time

import coremltools as ct
import numpy as np
import yaml


def load_model(path, function_name=None):
    compute_unit = ct.ComputeUnit.CPU_AND_NE
    if path.endswith(".mlmodelc"):
        if function_name:
            return ct.models.CompiledMLModel(path, compute_unit, function_name=function_name)
        return ct.models.CompiledMLModel(path, compute_unit)
    if function_name:
        return ct.models.MLModel(path, function_name=function_name)
    return ct.models.MLModel(path)


def find_part(model_dir, name):
    stem = re.sub(r"\.mlmodelc$", "", name)
    for candidate in (stem + ".mlmodelc", stem + ".mlpackage"):
        if os.path.isdir(os.path.join(model_dir, candidate)):
            return os.path.join(model_dir, candidate)
    raise FileNotFoundError(f"{model_dir}: no part {stem}")


def find_chunks(model_dir, first):
    m = re.search(r"_chunk_(\d+)of(\d+)", first)
    total = int(m.group(2))
    return [find_part(model_dir, first.replace(m.group(0), f"_chunk_{i:02d}of{total:02d}")) for i in range(1, total + 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--fp32-inputs", action="store_true", help="give float inputs as float32, not float16")
    ap.add_argument("--stats", action="store_true", help="print tokens and timings as one JSON object")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fdt = np.float32 if args.fp32_inputs else np.float16

    with open(os.path.join(args.model_dir, "meta.yaml")) as f:
        params = yaml.safe_load(f)["model_info"]["parameters"]
    embed = load_model(find_part(args.model_dir, params["embeddings"]))
    head = load_model(find_part(args.model_dir, params["lm_head"]))
    chunks = []
    for path in find_chunks(args.model_dir, params["ffn"]):
        probe = load_model(path)  # without a function name: the default function
        fns = {"infer": load_model(path, "infer"), "prefill": load_model(path, "prefill")}
        try:  # Gemma 3's rotate functions exist only in some models: probe them
            fns["infer_rotate"] = load_model(path, "infer_rotate")
        except (ValueError, RuntimeError):
            pass
        fns["default"] = probe
        chunks.append(fns)

    context = int(params["context_length"])
    batch = int(params["batch_size"])
    if hasattr(chunks[0]["infer"], "user_defined_metadata"):  # MLModel has it, CompiledMLModel does not
        meta = chunks[0]["infer"].user_defined_metadata
        context = int(meta.get("com.anemll.context_length", context))
        batch = int(meta.get("com.anemll.batch_size", batch))

    mask = np.triu(np.full((1, 1, context, context), -np.inf, dtype=np.float16), 1)
    state = chunks[0]["prefill"].make_state()
    t_loaded = time.perf_counter()
    tokens = [int(t) for t in args.prompt_ids.split(",")]
    n = len(tokens)

    # Prefill: full batches only; the rest goes through infer below.
    pos = 0
    while pos + batch <= n:
        ids = np.array([tokens[pos:pos + batch]], dtype=np.int32)
        hidden = embed.predict({"input_ids": ids})["hidden_states"]
        for fns in chunks:
            inputs = {
                "hidden_states": hidden.astype(fdt),
                "position_ids": np.arange(pos, pos + batch, dtype=np.int32),
                "causal_mask": mask[:, :, pos:pos + batch, :].astype(fdt),  # a strided row slice
                "current_pos": np.array([pos], dtype=np.int32),
            }
            hidden = fns["prefill"].predict(inputs, state)["output_hidden_states"]
        pos += batch

    def infer(token, at):
        hidden = embed.predict({"input_ids": np.array([[token]], dtype=np.int32)})["hidden_states"]
        update_mask = np.zeros((1, 1, context, 1), dtype=fdt)
        update_mask[0, 0, at, 0] = 1
        for fns in chunks:
            inputs = {
                "hidden_states": hidden.astype(fdt),
                "update_mask": update_mask,
                "position_ids": np.array([at], dtype=np.int32),
                "causal_mask": mask[:, :, at:at + 1, :] if fdt is np.float16 else mask[:, :, at:at + 1, :].astype(fdt),
                "current_pos": np.array([at], dtype=np.int32),
            }
            try:
                out = fns["infer"].predict(inputs, state=state)
            except (KeyError, RuntimeError) as e:  # older models take no update_mask
                if "update_mask" not in str(e):
                    raise
                del inputs["update_mask"]
                out = fns["infer"].predict(inputs, state=state)
            hidden = out["output_hidden_states"]
        out = head.predict({"hidden_states": hidden.astype(fdt)})
        names = sorted((k for k in out if k.startswith("logits")), key=lambda k: int(k[len("logits"):]))
        logits = np.concatenate([out[k] for k in names], axis=-1)
        return int(np.argmax(logits[0, -1]))

    for at in range(pos, n - 1):  # the prompt tokens after the last full batch
        infer(tokens[at], at)
    t_prefilled = time.perf_counter()
    generated = []
    token, at = tokens[-1], n - 1
    for _ in range(args.max_tokens):
        token = infer(token, at)
        generated.append(token)
        at += 1
        if at >= context:
            break
    t_done = time.perf_counter()
    if args.stats:
        print(json.dumps({"tokens": generated, "load_s": t_loaded - t0, "prefill_s": t_prefilled - t_loaded,
                          "decode_s": t_done - t_prefilled}))
    else:
        print(json.dumps(generated))


if __name__ == "__main__":
    sys.exit(main())
