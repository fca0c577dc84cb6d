"""convert(): validate a request, build every ANEMLL part into a staging directory, then rename it into place."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from anemll_fast.convert import graph, layout, package
from anemll_fast.convert.arch import ArchConfig, load_config_file, normalize_arch
from anemll_fast.convert.errors import ConvertError
from anemll_fast.convert.tokenizer import MIN_BYTE_VOCAB, write_byte_tokenizer
from anemll_fast.convert.weights import check_weights, random_weights

SourceLike = Union[str, os.PathLike, Mapping[str, Any]]


@dataclasses.dataclass
class LoadedSource:
    """Weights and tokenizer of one source, ready for conversion."""

    config: ArchConfig
    weights: Dict[str, np.ndarray]
    write_tokenizer: Callable[[Path], None]
    description: str


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    context_length: int
    batch_size: int
    num_chunks: int
    lut_ffn: Optional[int]
    lut_lmhead: Optional[int]
    lut_embeddings: Optional[int]
    palettize_mode: str
    split_lm_head: int
    argmax_head: bool
    model_prefix: str
    monolithic: bool = False
    contexts: Tuple[int, ...] = ()  # context switching: one infer/prefill pair per size (largest = context_length)


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ConvertError(f"{field} must be a positive integer, got {value!r}")
    return int(value)


def _lut_arg(value: Any, field: str) -> Optional[int]:
    if value is None or value == 0 or (isinstance(value, str) and value.lower() in ("none", "no", "")):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise ConvertError(f"{field} must be a number of bits or none, got {value!r}") from None
    return bits


def resolve_options(cfg: ArchConfig, *, context_length: Any, batch_size: Any, num_chunks: Any, lut_ffn: Any,
                    lut_lmhead: Any, lut_embeddings: Any, palettize_mode: str, split_lm_head: Any,
                    argmax_head: bool, model_prefix: Optional[str], monolithic: bool = False,
                    contexts: Optional[Any] = None) -> ConvertOptions:
    """Check every option against the architecture; raise ConvertError naming the first bad one."""
    ctx = _positive_int(context_length, "context_length")
    batch = _positive_int(batch_size, "batch_size")
    sizes: Tuple[int, ...] = ()
    if contexts:
        if isinstance(contexts, str):
            contexts = [c for c in contexts.replace(" ", "").split(",") if c]
        try:
            sizes = tuple(sorted({_positive_int(int(c) if isinstance(c, str) else c, "contexts") for c in contexts}))
        except ValueError:
            raise ConvertError(f"contexts must be positive integers, got {contexts!r}") from None
        if len(sizes) < 2:
            raise ConvertError(f"contexts: context switching needs at least two sizes, got {list(sizes)}")
        ctx = sizes[-1]  # the largest size is the model's context
        if cfg.is_gemma3 and cfg.sliding_window < ctx:
            raise ConvertError("contexts: context switching of sliding-window (Gemma 3) models is not supported")
    for size in sizes or (ctx,):
        if size % batch:
            raise ConvertError(f"context_length {size} is not divisible by batch_size {batch}")
    chunks = _positive_int(num_chunks, "num_chunks")
    if monolithic and chunks != 1:
        raise ConvertError(f"num_chunks {chunks}: a monolithic model is one file (use num_chunks=1)")
    if chunks > cfg.num_layers:
        raise ConvertError(f"num_chunks {chunks} exceeds the number of layers ({cfg.num_layers})")
    split = layout.default_split_lm_head(cfg.arch) if split_lm_head is None else split_lm_head
    split = _positive_int(split, "split_lm_head")
    if cfg.vocab_size % split:
        raise ConvertError(
            f"vocab_size {cfg.vocab_size} cannot be split into {split} equal lm_head parts (split_lm_head)"
        )
    luts = {}
    for field, value in (("lut_ffn", lut_ffn), ("lut_lmhead", lut_lmhead), ("lut_embeddings", lut_embeddings)):
        luts[field] = _lut_arg(value, field)
        package.check_palettize_args(luts[field], field, palettize_mode)
    prefix = model_prefix or layout.default_prefix(cfg.arch)
    if not prefix.replace("_", "").replace("-", "").isalnum():
        raise ConvertError(f"model_prefix {prefix!r} must be alphanumeric (with _ or -)")
    if cfg.is_gemma3 and cfg.sliding_window < ctx and cfg.sliding_window < batch:
        raise ConvertError(f"batch_size {batch} exceeds the sliding window {cfg.sliding_window}")
    return ConvertOptions(ctx, batch, chunks, luts["lut_ffn"], luts["lut_lmhead"], luts["lut_embeddings"],
                          palettize_mode, split, bool(argmax_head), prefix, bool(monolithic), sizes)


# ---------------------------------------------------------------------------------------------------- sources

def load_random(spec: Union[Mapping[str, Any], str, os.PathLike], arch: Optional[str] = None,
                seed: Optional[int] = None) -> LoadedSource:
    """A random-model spec: Hugging Face config keys (model_type, hidden_size, ...) plus optional 'seed'."""
    if not isinstance(spec, Mapping):
        spec = load_config_file(spec)
    spec = dict(spec)
    spec_seed = spec.pop("seed", None)
    if arch is not None:
        spec["model_type"] = arch
    cfg = ArchConfig.from_dict(spec) if "num_layers" in spec and "arch" in spec else ArchConfig.from_hf_config(spec)
    if cfg.name == "model":
        cfg = dataclasses.replace(cfg, name=f"random-{cfg.arch}")
    weights = random_weights(cfg, int(spec_seed if spec_seed is not None else (seed or 0)))

    def write_tok(out_dir: Path) -> None:
        if cfg.vocab_size >= MIN_BYTE_VOCAB:
            write_byte_tokenizer(out_dir, cfg.vocab_size)

    return LoadedSource(cfg, weights, write_tok, "random weights")


def load_source(source: SourceLike, arch: Optional[str], seed: int) -> LoadedSource:
    if isinstance(source, Mapping):
        return load_random(source, arch, seed)
    path = Path(source)
    if path.is_dir():
        from anemll_fast.convert.hf import load_hf_checkpoint

        return load_hf_checkpoint(path, arch)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from anemll_fast.convert.gguf_source import load_gguf

        return load_gguf(path, arch)
    if path.is_file() and path.suffix.lower() == ".json":
        return load_random(path, arch, seed)
    if not path.exists():
        raise ConvertError(f"source not found: {path}")
    raise ConvertError(
        f"source {path} is neither a Hugging Face checkpoint directory, a .gguf file nor a random-model .json spec"
    )


# ---------------------------------------------------------------------------------------------------- progress

class _Progress:
    """A tqdm bar over the stages on a terminal (its label follows the steps
    within a stage), else one plain line per finished stage with its duration;
    coremltools' own bars are silenced."""

    def __init__(self, enabled: bool, total: int):
        from anemll_fast import progress

        self.enabled = enabled and not progress.is_quiet()
        self.bar = progress.bar(total=total, desc="converting", unit="stage", enabled=self.enabled, leave=True)
        self.plain = self.enabled and self.bar.disable
        self.done, self.total = 0, total
        self.t = time.perf_counter()

    def stage(self, label: str) -> None:
        self.bar.set_description_str(label)
        self.t = time.perf_counter()

    def step(self, label: str) -> None:
        """A step within the current stage (the long ones have several)."""
        self.bar.set_description_str(label)

    def end(self, label: str) -> None:
        self.bar.update()
        self.done += 1
        if self.plain:
            print(f"[{self.done}/{self.total}] {label} ({time.perf_counter() - self.t:.1f}s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------------- building

def _anemll_metadata(opts: ConvertOptions, cfg: ArchConfig, **extra: Any) -> Dict[str, str]:
    md = {
        "com.anemll.info": "Converted with anemll_fast",
        "com.anemll.context_length": str(opts.context_length),
        "com.anemll.state_length": str(opts.context_length),
        "com.anemll.batch_size": str(opts.batch_size),
        "com.anemll.num_chunks": str(opts.num_chunks),
        "com.anemll.architecture": cfg.arch,
    }
    md.update({f"com.anemll.{k}": str(v) for k, v in extra.items() if v is not None})
    return md


def _write_meta(path: Path, short: str, md: Dict[str, str]) -> None:
    package.write_metadata(path, author="Converted with anemll_fast", version=layout.ANEMLL_VERSION,
                           short_description=short, user_defined=md)


def _build_embeddings(cfg, weights, opts: ConvertOptions, path: Path) -> None:
    import coremltools as ct

    prog = graph.build_embeddings_program(cfg, weights)
    shapes = ct.EnumeratedShapes(shapes=[[1, 1], [1, opts.batch_size]], default=[1, 1])
    package.palettize(prog, opts.lut_embeddings, "gather", opts.palettize_mode)
    model = package.program_to_model(prog, inputs=[ct.TensorType(name="input_ids", shape=shapes, dtype=np.int32)])
    package.save_model(model, path)
    _write_meta(path, "Anemll Model (Embeddings) converted to CoreML",
                _anemll_metadata(opts, cfg, lut_bits=opts.lut_embeddings))


INFER_CTX_TEMPLATE, PREFILL_CTX_TEMPLATE = "infer_ctx{context}", "prefill_ctx{context}"


def ffn_functions(cfg: ArchConfig, context_length: int, contexts: Tuple[int, ...] = ()) -> List[Tuple[str, int]]:
    """(function, its context length) of each FFN chunk (or monolithic file): the rotate pair when a sliding
    window is shorter than the context, as ANEMLL 0.3.5 converts Gemma 3; with context switching one
    infer_ctx{N}/prefill_ctx{N} pair per size, as ANEMLL's multi-context exports."""
    if contexts:
        return [(t.format(context=n), n) for n in contexts for t in (INFER_CTX_TEMPLATE, PREFILL_CTX_TEMPLATE)]
    rotate = cfg.is_gemma3 and cfg.sliding_window < context_length
    names = ["infer", "prefill"] + (["infer_rotate", "prefill_rotate"] if rotate else [])
    return [(n, context_length) for n in names]


def _build_ffn_chunk(cfg, weights, opts: ConvertOptions, chunk: graph.ChunkPlan, path: Path, scratch: Path,
                     step: Callable[[str], None] = lambda label: None) -> None:
    parts = {}
    head = (opts.split_lm_head, opts.argmax_head) if opts.monolithic else None
    functions = ffn_functions(cfg, opts.context_length, opts.contexts)
    for fname, context in functions:
        step(fname)
        prefill = fname.startswith("prefill")
        prog = graph.build_ffn_program(cfg, weights, chunk, seq_len=opts.batch_size if prefill else 1,
                                       context_length=context, prefill=prefill,
                                       rotate=fname.endswith("_rotate"), head=head)
        package.palettize(prog, opts.lut_ffn, "conv", opts.palettize_mode)
        if opts.monolithic:
            package.palettize(prog, opts.lut_embeddings, "gather", opts.palettize_mode)
        model = package.program_to_model(prog)
        tmp = scratch / f"{path.stem}.{fname}.mlpackage"
        package.save_model(model, tmp)
        del model, prog
        parts[fname] = tmp
    step("merging the functions")
    package.merge_functions(parts, path, default=functions[-2][0] if opts.contexts else "infer")
    for tmp in parts.values():
        package.remove_tree(tmp)
    _write_meta(path, "Anemll Model: Monolithic" if opts.monolithic else "Anemll Model: Multifunction FFN+Prefill",
                _anemll_metadata(opts, cfg, chunk_no=chunk.index + 1, lut_bits=opts.lut_ffn,
                                 functions=",".join(parts), first_layer=chunk.start,
                                 num_layers=chunk.stop - chunk.start, sliding_window=cfg.sliding_window))


def _build_lm_head(cfg, weights, opts: ConvertOptions, path: Path) -> None:
    prog = graph.build_lm_head_program(cfg, weights, parts=opts.split_lm_head, argmax=opts.argmax_head)
    package.palettize(prog, opts.lut_lmhead, "conv", opts.palettize_mode)
    model = package.program_to_model(prog)
    package.save_model(model, path)
    _write_meta(path, "Anemll Model (LM Head) converted to CoreML",
                _anemll_metadata(opts, cfg, lut_bits=opts.lut_lmhead, split_lm_head=opts.split_lm_head,
                                 vocab_size=cfg.vocab_size,
                                 argmax_in_model="true" if opts.argmax_head else "false"))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConvertError(f"output directory {out_dir} exists and is not empty (pass overwrite=True to replace it)")
    if not out_dir.parent.exists():
        raise ConvertError(f"parent directory of the output {out_dir} does not exist")


def _build_parts(cfg, weights, opts: ConvertOptions, chunks: List[graph.ChunkPlan], stage: Path, scratch: Path,
                 bar: "_Progress") -> None:
    name = layout.embeddings_stem(opts.model_prefix, opts.lut_embeddings)
    bar.stage("embeddings")
    _build_embeddings(cfg, weights, opts, stage / f"{name}.mlpackage")
    bar.end("embeddings")
    for chunk in chunks:
        label = f"FFN chunk {chunk.index + 1}/{len(chunks)} (layers {chunk.start}-{chunk.stop - 1})"
        bar.stage(label)
        stem = layout.ffn_stem(opts.model_prefix, opts.lut_ffn, chunk.index, len(chunks))
        _build_ffn_chunk(cfg, weights, opts, chunk, stage / f"{stem}.mlpackage", scratch,
                         step=lambda what, label=label: bar.step(f"{label}: {what}"))
        bar.end(label)
    bar.stage("LM head")
    _build_lm_head(cfg, weights, opts, stage / f"{layout.lm_head_stem(opts.model_prefix, opts.lut_lmhead)}.mlpackage")
    bar.end("LM head")


def build_model(loaded: LoadedSource, out_dir: Path, opts: ConvertOptions, *, progress: bool,
                overwrite: bool = False, extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Write every part into a hidden staging directory next to out_dir, then rename it into place."""
    cfg, weights = loaded.config, loaded.weights
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir, overwrite)
    chunks = graph.plan_chunks(cfg.num_layers, opts.num_chunks)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    package.remove_tree(stage)
    stage.mkdir()
    bar = _Progress(progress, total=2 if opts.monolithic else len(chunks) + 3)
    try:
        scratch = stage / ".scratch"
        scratch.mkdir()
        if opts.monolithic:
            bar.stage("monolithic model")
            stem = layout.monolithic_stem(opts.model_prefix, opts.lut_ffn)
            _build_ffn_chunk(cfg, weights, opts, chunks[0], stage / f"{stem}.mlpackage", scratch,
                             step=lambda what: bar.step(f"monolithic model: {what}"))
            bar.end("monolithic model")
        else:
            _build_parts(cfg, weights, opts, chunks, stage, scratch, bar)
        package.remove_tree(scratch)
        bar.stage("tokenizer and meta.yaml")
        loaded.write_tokenizer(stage)
        if extra_files is not None:
            extra_files(stage)
        # meta.yaml last: its presence marks a complete model directory.
        (stage / "meta.yaml").write_text(layout.meta_yaml(
            name=cfg.name, arch=cfg.arch, context_length=opts.context_length, state_length=opts.context_length,
            batch_size=opts.batch_size, lut_embeddings=opts.lut_embeddings, lut_ffn=opts.lut_ffn,
            lut_lmhead=opts.lut_lmhead, num_chunks=opts.num_chunks, prefix=opts.model_prefix,
            split_lm_head=opts.split_lm_head, vocab_size=cfg.vocab_size,
            chunk_sizes=graph.lm_head_parts(cfg.vocab_size, opts.split_lm_head), argmax_in_model=opts.argmax_head,
            source=loaded.description, monolithic=opts.monolithic, sliding_window=cfg.sliding_window,
            functions=[f for f, _ in ffn_functions(cfg, opts.context_length, opts.contexts)],
            contexts=opts.contexts), encoding="utf-8")
        bar.end("tokenizer and meta.yaml")
        _move_into_place(stage, out_dir)
    except BaseException:
        package.remove_tree(stage)
        raise
    finally:
        bar.close()
    return out_dir


def _move_into_place(stage: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, out_dir)


# ---------------------------------------------------------------------------------------------------- public

def convert(source: SourceLike, out_dir: Union[str, os.PathLike], *, arch: Optional[str] = None,
            context_length: int = 512, batch_size: int = 64, num_chunks: int = 1, lut_ffn: Optional[int] = None,
            lut_lmhead: Optional[int] = None, lut_embeddings: Optional[int] = None, palettize_mode: str = "uniform",
            split_lm_head: Optional[int] = None, argmax_head: bool = False, model_prefix: Optional[str] = None,
            progress: bool = True, seed: int = 0, overwrite: bool = False, monolithic: bool = False,
            contexts: Optional[Any] = None) -> Path:
    """Convert a Hugging Face checkpoint directory, a .gguf file, or a random-model spec (dict or .json path)
    into an ANEMLL-layout model directory; return its path.

    Everything (architecture, tensors, sizes, options) is validated before any file is written; parts are built
    in a hidden sibling directory renamed to out_dir only when complete.
    """
    if arch is not None:
        arch = normalize_arch(arch)
    from anemll_fast import progress as bars

    with bars.bar(desc="reading the source weights", bar_format="{desc} ({elapsed})", enabled=progress) as b:
        loaded = load_source(source, arch, seed)
        b.update()
    if arch is not None and loaded.config.arch != arch:
        raise ConvertError(f"--arch {arch} does not match the source's architecture {loaded.config.arch}")
    check_weights(loaded.config, loaded.weights, source=loaded.description)
    opts = resolve_options(loaded.config, context_length=context_length, batch_size=batch_size,
                           num_chunks=num_chunks, lut_ffn=lut_ffn, lut_lmhead=lut_lmhead,
                           lut_embeddings=lut_embeddings, palettize_mode=palettize_mode,
                           split_lm_head=split_lm_head, argmax_head=argmax_head, model_prefix=model_prefix,
                           monolithic=monolithic, contexts=contexts)
    return build_model(loaded, Path(out_dir), opts, progress=progress, overwrite=overwrite)


def convert_random(spec: Union[Mapping[str, Any], str, os.PathLike], out_dir: Union[str, os.PathLike],
                   **kwargs: Any) -> Path:
    """convert() of a random-model spec (Hugging Face config keys, optional 'seed')."""
    if not isinstance(spec, Mapping):
        spec = load_config_file(spec)
    return convert(dict(spec), out_dir, **kwargs)
