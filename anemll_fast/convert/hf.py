"""Hugging Face checkpoint directories: config.json + safetensors (fp32/fp16/bf16), read without PyTorch."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from anemll_fast.convert.arch import ArchConfig, load_config_file
from anemll_fast.convert.errors import ConvertError
from anemll_fast.convert.tokenizer import copy_tokenizer_files
from anemll_fast.convert.weights import expected_shapes

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors_header(path: Path) -> Dict[str, dict]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ConvertError(f"{path}: truncated safetensors file (no header)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 * 2 ** 20:
                raise ConvertError(f"{path}: implausible safetensors header size {size}")
            header = json.loads(fh.read(size))
    except OSError as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        info["_data_start"] = 8 + size
    return header


def read_safetensors_tensor(path: Path, name: str, info: dict) -> np.ndarray:
    """One tensor as float32; bf16 is widened by shifting its bits into the top half of a float32."""
    dtype = info.get("dtype")
    if dtype not in _DTYPES:
        raise ConvertError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    np_dtype = np.dtype(_DTYPES[dtype])
    count = int(np.prod(shape)) if shape else 1
    if end - start != count * np_dtype.itemsize:
        raise ConvertError(f"{path}: tensor {name} byte size does not match its shape {shape}")
    try:
        data = np.fromfile(path, dtype=np_dtype, count=count, offset=info["_data_start"] + start)
    except OSError as exc:
        raise ConvertError(f"cannot read tensor {name} from {path}: {exc}") from None
    if data.size != count:
        raise ConvertError(f"{path}: tensor {name} is truncated")
    if dtype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False).reshape(shape)


def load_hf_checkpoint(path: Path, arch: Optional[str] = None):
    """Read config.json and the tensors the converter needs from every *.safetensors file in path."""
    from anemll_fast.convert.pipeline import LoadedSource

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConvertError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    cfg_dict = load_config_file(path / "config.json")
    cfg = ArchConfig.from_hf_config(cfg_dict, arch=cfg_dict.get("model_type") if arch is None else arch)
    if cfg.name == "model":
        import dataclasses

        cfg = dataclasses.replace(cfg, name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{path} has no *.safetensors weights")
    index: Dict[str, tuple] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            index[name] = (f, info)
    wanted = expected_shapes(cfg)
    weights: Dict[str, np.ndarray] = {}
    for name in wanted:
        if name in index:
            f, info = index[name]
            weights[name] = read_safetensors_tensor(f, name, info)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in index and "model.embed_tokens.weight" in index:
        raise ConvertError(f"checkpoint {path} is missing tensor(s): lm_head.weight (config says untied)")

    def write_tok(out_dir: Path) -> None:
        copy_tokenizer_files(path, out_dir)

    return LoadedSource(cfg, weights, write_tok, f"Hugging Face checkpoint {path.name}")
