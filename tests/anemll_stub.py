"""Stub ANEMLL model directories for config tests: real Core ML packages with
ANEMLL's I/O (names, shapes, dtypes, states, functions) but trivial bodies.

Built with coremltools' MIL builder, so they are what Core ML would load; the
numerics are not the point here (the converter's tests check those).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

logging.getLogger("coremltools").setLevel(logging.ERROR)

import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

TARGET = ct.target.iOS18


def _save(prog, path: Path, inputs=None, metadata: Optional[Dict[str, str]] = None) -> Path:
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=TARGET,
        skip_model_load=True,
        inputs=inputs,
    )
    for key, value in (metadata or {}).items():
        model.user_defined_metadata[key] = value
    model.save(str(path))
    return path


def embeddings(path: Path, vocab: int, hidden: int, batch: int) -> Path:
    from coremltools.converters.mil.mil import get_new_symbol

    @mb.program(input_specs=[mb.TensorSpec((1, get_new_symbol()), dtype=types.int32)], opset_version=TARGET)
    def prog(input_ids):
        table = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float16)
        return mb.gather(x=table, indices=input_ids, axis=0, name="hidden_states")

    shapes = ct.EnumeratedShapes(shapes=[[1, 1], [1, batch]], default=[1, batch])
    return _save(prog, path, inputs=[ct.TensorType(name="input_ids", shape=shapes, dtype=np.int32)])


def _ffn_function(seq: int, out_seq: int, hidden: int, ctx: int, state_shape, update_mask: bool):
    specs = [
        mb.TensorSpec((1, seq, hidden), dtype=types.fp16),
        mb.TensorSpec((seq,), dtype=types.int32),
        mb.TensorSpec((1, 1, seq, ctx), dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
    ]
    if update_mask:
        specs.append(mb.TensorSpec((1, 1, ctx, seq), dtype=types.fp16))
    specs.append(mb.StateTensorSpec(tuple(state_shape), dtype=types.fp16))

    def body(hidden_states, position_ids, causal_mask, current_pos, *rest):
        state = rest[-1]
        kv = mb.read_state(input=state)
        bumped = mb.add(x=kv, y=np.float16(0))
        mb.coreml_update_state(state=state, value=bumped)
        m = mb.reduce_sum(x=causal_mask, axes=[-1], keep_dims=False)  # [1,1,seq]
        m = mb.reshape(x=m, shape=[1, seq, 1])
        h = mb.add(x=hidden_states, y=mb.mul(x=m, y=np.float16(0)))
        if out_seq != seq:
            h = mb.slice_by_index(x=h, begin=[0, 0, 0], end=[1, out_seq, hidden])
        return mb.identity(x=h, name="output_hidden_states")

    names = ["hidden_states", "position_ids", "causal_mask", "current_pos"]
    if update_mask:
        names.append("update_mask")
    names.append("model_model_kv_cache_0")
    for spec, name in zip(specs, names):
        spec.name = name
    return mb.program(input_specs=specs, opset_version=TARGET)(_named(body, names))


def _named(fn, names):
    # mb.program takes the argument names of the Python function as input names.
    args = ", ".join(names)
    src = f"def prog({args}):\n    return fn({args})\n"
    scope = {"fn": fn}
    exec(src, scope)
    return scope["prog"]


def ffn_chunk(
    path: Path, *, hidden: int, ctx: int, batch: int, state_shape, last: bool,
    update_mask: bool = False, tmp: Path,
) -> Path:
    infer = _save(_ffn_function(1, 1, hidden, ctx, state_shape, update_mask), tmp / (path.stem + "_infer.mlpackage"))
    prefill = _save(
        _ffn_function(batch, 1 if last else batch, hidden, ctx, state_shape, update_mask),
        tmp / (path.stem + "_prefill.mlpackage"),
    )
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(infer), src_function_name="main", target_function_name="infer")
    desc.add_function(str(prefill), src_function_name="main", target_function_name="prefill")
    desc.default_function_name = "infer"
    ct.utils.save_multifunction(desc, str(path))
    return path


def lm_head(path: Path, *, hidden: int, vocab: int, parts: int, argmax: bool = False) -> Path:
    size = vocab // parts

    @mb.program(input_specs=[mb.TensorSpec((1, 1, hidden), dtype=types.fp16)], opset_version=TARGET)
    def prog(hidden_states):
        outs = []
        rng = np.random.default_rng(1)
        for i in range(parts):
            w = rng.standard_normal((size, hidden)).astype(np.float16)
            logits = mb.linear(x=hidden_states, weight=w)
            if argmax:
                idx = mb.reduce_argmax(x=logits, axis=-1, keep_dims=False)
                val = mb.reduce_max(x=logits, axes=[-1], keep_dims=False)
                outs.append((idx, val))
            else:
                outs.append(mb.identity(x=logits, name=f"logits{i + 1}"))
        if argmax:
            idx = mb.concat(values=[o[0] for o in outs], axis=-1)
            val = mb.concat(values=[o[1] for o in outs], axis=-1)
            return (
                mb.reshape(x=idx, shape=[parts], name="argmax_idx"),
                mb.reshape(x=val, shape=[parts], name="argmax_val"),
            )
        return tuple(outs)

    return _save(prog, path)


def build(
    out: Path,
    *,
    prefix: str = "qwen",
    num_chunks: int = 2,
    hidden: int = 16,
    vocab: int = 64,
    ctx: int = 16,
    batch: int = 4,
    layers: int = 2,
    kv_heads: int = 1,
    head_dim: int = 8,
    state_len: Optional[int] = None,
    parts: int = 4,
    lut_ffn="none",
    lut_lmhead="none",
    lut_embeddings="none",
    argmax: bool = False,
    update_mask: bool = False,
    meta_version: str = "0.3.4",
    write_meta: bool = True,
) -> Path:
    """An ANEMLL-layout directory; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".build"
    tmp.mkdir(exist_ok=True)
    lut = lambda v: "" if v == "none" else f"_lut{v}"  # noqa: E731
    emb_name = f"{prefix}_embeddings{lut(lut_embeddings)}"
    head_name = f"{prefix}_lm_head{lut(lut_lmhead)}"
    ffn_base = f"{prefix}_FFN_PF{lut(lut_ffn)}"
    state_shape = (2 * layers, kv_heads, state_len or ctx, head_dim)
    embeddings(out / f"{emb_name}.mlpackage", vocab, hidden, batch)
    for i in range(1, num_chunks + 1):
        ffn_chunk(
            out / f"{ffn_base}_chunk_{i:02d}of{num_chunks:02d}.mlpackage",
            hidden=hidden, ctx=ctx, batch=batch, state_shape=state_shape,
            last=(i == num_chunks), update_mask=update_mask, tmp=tmp,
        )
    lm_head(out / f"{head_name}.mlpackage", hidden=hidden, vocab=vocab, parts=parts, argmax=argmax)
    shutil.rmtree(tmp)
    if write_meta:
        params = {
            "context_length": ctx,
            "batch_size": batch,
            "lut_embeddings": lut_embeddings,
            "lut_ffn": lut_ffn,
            "lut_lmhead": lut_lmhead,
            "num_chunks": num_chunks,
            "model_prefix": prefix,
            "embeddings": f"{emb_name}.mlmodelc",
            "lm_head": f"{head_name}.mlmodelc",
            "ffn": f"{ffn_base}.mlmodelc",
            "split_lm_head": parts,
        }
        if meta_version != "0.3.4":
            params.update({
                "ffn": f"{ffn_base}_chunk_01of{num_chunks:02d}.mlmodelc",
                "vocab_size": vocab,
                "lm_head_chunk_sizes": [vocab // parts] * parts,
                "argmax_in_model": argmax,
                "state_length": state_len or ctx,
            })
        meta = {
            "model_info": {
                "name": f"anemll-test-ctx{ctx}",
                "version": meta_version,
                "architecture": prefix,
                "framework": "Core ML",
                "parameters": params,
            }
        }
        (out / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    return out


_MIL_TYPES = {"FLOAT16": "fp16", "FLOAT32": "fp32", "INT32": "int32"}


def _mil_tensor(spec, dims=None) -> str:
    dims = spec.shape if dims is None else dims
    return f"tensor<{_MIL_TYPES[spec.data_type]}, [{', '.join(str(d) for d in dims)}]>"


def compile_stub(package: Path, out: Path, *, flexible_as_symbol: bool = True) -> Path:
    """A `.mlmodelc` with the package's interface, in coremlc's text syntax.

    The bodies only declare the returned values (enough for interface scans);
    enumerated input shapes go to metadata.json as coremlc writes them.
    """
    import json

    from anemll_fast.model_io import read_model_io

    io = read_model_io(package)
    out.mkdir(parents=True)
    funcs = []
    schema_inputs = []
    for fname, fio in io.functions.items():
        args = []
        for spec in fio.inputs.values():
            dims = spec.shape
            if spec.enumerated_shapes and flexible_as_symbol:
                varying = [i for i in range(len(dims)) if len({s[i] for s in spec.all_shapes}) > 1]
                dims = ["?" if i in varying else d for i, d in enumerate(dims)]
            args.append(f"{_mil_tensor(spec, dims)} {spec.name}")
            if fname == io.default_function:
                entry = {
                    "name": spec.name, "type": "MultiArray", "dataType": "Float16",
                    "shape": json.dumps(list(spec.shape)),
                    "hasShapeFlexibility": "1" if spec.enumerated_shapes else "0",
                }
                if spec.enumerated_shapes:
                    entry["shapeFlexibility"] = " | ".join(
                        " × ".join(str(d) for d in s) for s in spec.all_shapes
                    )
                schema_inputs.append(entry)
        for spec in fio.states.values():
            args.append(f"state<{_mil_tensor(spec)}> {spec.name}")
        first = next(iter(fio.inputs))
        body = []
        for spec in fio.outputs.values():
            dims = spec.shape
            if spec.enumerated_shapes and flexible_as_symbol:
                varying = [i for i in range(len(dims)) if len({s[i] for s in spec.all_shapes}) > 1]
                dims = ["?" if i in varying else d for i, d in enumerate(dims)]
            body.append(
                f"            {_mil_tensor(spec, dims)} {spec.name} = identity(x = {first})"
                f"[name = string(\"{spec.name}\")];"
            )
        funcs.append(
            f"    func {fname}<ios18>({', '.join(args)}) {{\n" + "\n".join(body)
            + f"\n        }} -> ({', '.join(fio.outputs)});"
        )
    text = (
        "program(1.3)\n"
        '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3500.0.0"}, {"coremltools-version", "9.0"}})]\n'
        "{\n" + "\n".join(funcs) + "\n}\n"
    )
    (out / "model.mil").write_text(text, encoding="utf-8")
    meta = {
        "specificationVersion": 9,
        "modelType": {"name": "MLModelType_mlProgram"},
        "userDefinedMetadata": io.metadata,
        "inputSchema": schema_inputs,
    }
    if io.multifunction:
        meta["defaultFunctionName"] = io.default_function
    (out / "metadata.json").write_text(json.dumps([meta], indent=2), encoding="utf-8")
    (out / "weights").mkdir()
    (out / "weights" / "weight.bin").write_bytes(b"")
    return out


def compile_dir(src: Path, dst: Path) -> Path:
    """Copy of an ANEMLL directory with every part as `.mlmodelc`."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.suffix == ".mlpackage":
            compile_stub(item, dst / (item.stem + ".mlmodelc"))
        elif item.is_file():
            shutil.copy(item, dst / item.name)
    return dst
