"""constexpr_* ops: compressed constants, decoded once when the plan is built (never per call)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np

from anemll_fast.mil.blobfile import unpack_bits
from anemll_fast.mil.ops.registry import BuildContext

# op type -> decoder(ctx) -> list of output arrays (compute form)
CONSTEXPR: Dict[str, Callable[[BuildContext], List[np.ndarray]]] = {}


def _constexpr(name: str):
    def deco(fn):
        CONSTEXPR[name] = fn
        return fn

    return deco


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: Optional[int]) -> np.ndarray:
    """iOS18 palettization: lut [*blocks, NUM_PALETTES, VECTOR_SIZE], one table per block of indices."""
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"lut of rank {lut.ndim} for rank-{rank} indices (needs rank {rank + 2})")
    blocks = lut.shape[:rank]
    for i in range(rank):
        if blocks[i] == 0 or indices.shape[i] % blocks[i]:
            raise ValueError(f"indices dim {i} ({indices.shape[i]}) is not divisible by lut dim ({blocks[i]})")
    if indices.size and int(indices.max()) >= lut.shape[rank]:
        raise ValueError(f"index {int(indices.max())} outside a {lut.shape[rank]}-entry palette")
    grids = tuple(
        (np.arange(indices.shape[i]) // (indices.shape[i] // blocks[i])).reshape(
            [-1 if j == i else 1 for j in range(rank)])
        for i in range(rank)
    )
    vals = lut[grids + (indices.astype(np.intp),)]  # [*indices.shape, VECTOR_SIZE]
    vs = lut.shape[-1]
    if vs == 1:
        return vals[..., 0]
    if vector_axis is None:
        raise ValueError("vector palettization (VECTOR_SIZE > 1) needs vector_axis")
    va = vector_axis % rank
    vals = np.moveaxis(vals, -1, va + 1)
    shape = list(indices.shape)
    shape[va] *= vs
    return vals.reshape(shape)


@_constexpr("constexpr_lut_to_dense")
def _lut(ctx: BuildContext) -> List[np.ndarray]:
    lut = np.asarray(ctx.const("lut"))
    indices = np.asarray(ctx.const("indices"))
    if ctx.has("shape"):  # iOS16 form: flat lut, indices packed into uint8 bytes, explicit shape
        shape = ctx.ints("shape")
        nbits = int(np.log2(lut.size))
        if 2 ** nbits != lut.size:
            raise ValueError(f"lut size {lut.size} is not a power of two")
        count = int(np.prod(shape))
        idx = unpack_bits(indices.astype(np.uint8).reshape(-1), nbits, count)
        return [lut.reshape(-1)[idx.astype(np.intp)].reshape(shape)]
    va = ctx.scalar("vector_axis", None)
    return [lut_to_dense(indices, lut, None if va is None else int(va))]


@_constexpr("constexpr_affine_dequantize")
def _affine(ctx: BuildContext) -> List[np.ndarray]:
    q = np.asarray(ctx.const("quantized_data")).astype(np.float32)
    zp = np.asarray(ctx.const("zero_point")).astype(np.float32)
    scale = np.asarray(ctx.const("scale")).astype(np.float32)
    axis = int(ctx.scalar("axis")) % q.ndim
    shape = [1] * q.ndim
    shape[axis] = -1
    if zp.ndim == 1 and zp.size > 1:
        zp = zp.reshape(shape)
    if scale.ndim == 1 and scale.size > 1:
        scale = scale.reshape(shape)
    return [(q - zp) * scale]


def shift_scale(data: np.ndarray, scale: np.ndarray, offset: Optional[np.ndarray]) -> np.ndarray:
    """iOS18 blockwise dequantization: scale (and offset) repeat over blocks of data."""
    data = data.astype(np.float32)
    if scale.ndim != data.ndim:
        raise ValueError(f"scale has rank {scale.ndim}, data has rank {data.ndim}")
    for axis in range(data.ndim):
        if scale.shape[axis] == 0 or data.shape[axis] % scale.shape[axis]:
            raise ValueError(f"data dim {axis} ({data.shape[axis]}) is not a multiple of scale dim "
                             f"({scale.shape[axis]})")
        rep = data.shape[axis] // scale.shape[axis]
        if rep > 1:
            scale = np.repeat(scale, rep, axis)
            if offset is not None:
                offset = np.repeat(offset, rep, axis)
    if offset is not None:
        data = data - offset
    return scale * data


def _offset(ctx: BuildContext) -> Optional[np.ndarray]:
    offset = ctx.const("offset", None)
    return None if offset is None else np.asarray(offset).astype(np.float32)


@_constexpr("constexpr_blockwise_shift_scale")
def _blockwise(ctx: BuildContext) -> List[np.ndarray]:
    scale = np.asarray(ctx.const("scale")).astype(np.float32)
    return [shift_scale(np.asarray(ctx.const("data")), scale, _offset(ctx))]


def _densify(mask: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    if int(np.count_nonzero(mask)) != nonzero.size:
        raise ValueError(f"mask has {int(np.count_nonzero(mask))} ones for {nonzero.size} values")
    dense = np.zeros(mask.shape, dtype=nonzero.dtype)
    dense[mask != 0] = nonzero.reshape(-1)
    return dense


@_constexpr("constexpr_lut_to_sparse")
def _lut_sparse(ctx: BuildContext) -> List[np.ndarray]:
    # The palette of a nonzero entry depends on its dense position (blockwise LUTs): decode densely,
    # then keep the (vector-expanded) masked positions.
    mask = np.asarray(ctx.const("indices_mask")) != 0
    lut = np.asarray(ctx.const("lut"))
    dense_idx = _densify(mask, np.asarray(ctx.const("indices_nonzero_data")).astype(np.intp))
    va = ctx.scalar("vector_axis", None)
    dense = lut_to_dense(dense_idx, lut, None if va is None else int(va))
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(va) % mask.ndim)
    return [mask.astype(np.uint8), dense[mask]]


@_constexpr("constexpr_sparse_blockwise_shift_scale")
def _sparse_blockwise(ctx: BuildContext) -> List[np.ndarray]:
    mask = np.asarray(ctx.const("data_mask")) != 0
    dense = _densify(mask, np.asarray(ctx.const("nonzero_data")).astype(np.float32))
    scale = np.asarray(ctx.const("scale")).astype(np.float32)
    return [mask.astype(np.uint8), shift_scale(dense, scale, _offset(ctx))[mask]]


@_constexpr("constexpr_cast")
def _cast(ctx: BuildContext) -> List[np.ndarray]:
    return [np.asarray(ctx.const("source_val")).astype(np.float32)]


@_constexpr("constexpr_sparse_to_dense")
def _sparse(ctx: BuildContext) -> List[np.ndarray]:
    nz = np.asarray(ctx.const("nonzero_data"))
    mask = np.asarray(ctx.const("mask"))
    if ctx.has("shape"):  # iOS16: bitmask packed in uint8 bytes
        shape = ctx.ints("shape")
        bits = np.unpackbits(mask.astype(np.uint8).reshape(-1), bitorder="little")[: int(np.prod(shape))]
        mask = bits.reshape(shape)
    return [_densify(mask, nz)]
