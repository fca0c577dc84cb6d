"""ModelConfig of an ANEMLL model directory: meta.yaml plus the parts' real I/O.

meta.yaml (ANEMLL 0.3.4 and 0.3.5) says which parts exist; the shapes come
from the model files themselves, as chat.py finds them: compiled `.mlmodelc`
first, then the `.mlpackage` of the same stem, then (embeddings only) the name
without `_lutN`. FFN chunks are `*_chunk_NNofMM`; 0.3.4's `ffn:` names no chunk.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from anemll_fast.config import ComponentConfig, ModelConfig, Shapes, TensorSpec
from anemll_fast.errors import ConfigError
from anemll_fast.hub import safe_unzip
from anemll_fast.text_files import read_utf8
from anemll_fast.model_io import MODEL_SUFFIXES, ModelIO, read_model_io

log = logging.getLogger("anemll_fast")
_CHUNK_RE = re.compile(r"_chunk_(\d+)of(\d+)$")
_LUT_RE = re.compile(r"_lut\d+$")


def read_meta(path: Union[str, Path]) -> Dict[str, Any]:
    """`model_info` of a meta.yaml, with `parameters` checked and typed."""
    import yaml

    path = Path(path)
    text = read_utf8(path, ConfigError)
    try:
        # libyaml's parser when PyYAML has it (the pure-Python one costs a load ~20 ms); same safe subset.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_info"), dict):
        raise ConfigError(f"{path}: missing section 'model_info'")
    info = data["model_info"]
    params = info.get("parameters")
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: missing section 'model_info.parameters'")
    if str(info.get("model_type", "chunked")) not in ("chunked", "monolithic"):
        raise ConfigError(f"{path}: model_info.model_type must be chunked or monolithic, got {info['model_type']!r}")
    if "sliding_window" in params:
        params["sliding_window"] = _positive_int(params["sliding_window"], f"{path}: model_info.parameters.sliding_window")
    functions = params.get("functions")
    if functions is not None and (not isinstance(functions, list) or not all(isinstance(f, str) for f in functions)):
        raise ConfigError(f"{path}: model_info.parameters.functions must be a list of function names, got {functions!r}")
    for key in ("context_length", "batch_size", "num_chunks"):
        if key in params:
            params[key] = _positive_int(params[key], f"{path}: model_info.parameters.{key}")
    for key in ("lut_embeddings", "lut_ffn", "lut_lmhead"):
        value = params.get(key, "none")
        if value in (None, "none", "None", False):
            params[key] = "none"
        else:
            params[key] = _positive_int(value, f"{path}: model_info.parameters.{key}")
    if "split_lm_head" in params:
        params["split_lm_head"] = _positive_int(params["split_lm_head"], f"{path}: model_info.parameters.split_lm_head")
    for key in ("model_prefix", "embeddings", "lm_head", "ffn", "monolithic_model", "pf"):
        if key in params and not isinstance(params[key], str):
            raise ConfigError(f"{path}: model_info.parameters.{key} must be a file name, got {params[key]!r}")
    return info


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return number


def _lut(value: Any) -> str:
    return "" if value == "none" else f"_lut{value}"


def _stem(name: str) -> str:
    for suffix in MODEL_SUFFIXES + (".mlmodelc.zip",):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_part(directory: Path, name: str, *, drop_lut: bool = False) -> Optional[Path]:
    """The model file for `name` (with or without extension), as chat.py looks."""
    stems = [_stem(name)]
    if drop_lut and _LUT_RE.search(stems[0]):
        stems.append(_LUT_RE.sub("", stems[0]))
    for stem in stems:
        for suffix in (".mlmodelc", ".mlpackage"):
            candidate = directory / (stem + suffix)
            if candidate.exists():
                return candidate
        archive = directory / (stem + ".mlmodelc.zip")
        if archive.is_file():
            return safe_unzip(archive, directory / (stem + ".mlmodelc"))
    return None


def _require_part(directory: Path, name: str, field: str, *, drop_lut: bool = False) -> Path:
    found = find_part(directory, name, drop_lut=drop_lut)
    if found is None:
        tried = f"{_stem(name)}.mlmodelc / .mlpackage / .mlmodelc.zip"
        raise ConfigError(f"{directory}/meta.yaml: {field} {name!r} not found (looked for {tried})")
    return found


def _chunk_names(ffn_stem: str, num_chunks: int, directory: Path) -> List[str]:
    """Stems of the FFN chunks, from meta's `ffn` and `num_chunks`."""
    base = _CHUNK_RE.sub("", ffn_stem)
    named = [f"{base}_chunk_{i:02d}of{num_chunks:02d}" for i in range(1, num_chunks + 1)]
    if num_chunks == 1 and find_part(directory, named[0]) is None and find_part(directory, base):
        return [base]  # a single unchunked FFN file
    return named


def _discover(directory: Path) -> Dict[str, Any]:
    """Parameters of a directory without meta.yaml, from its file names."""
    names = sorted({_stem(p.name) for p in directory.iterdir() if p.name.endswith(MODEL_SUFFIXES + (".mlmodelc.zip",))})
    emb = [n for n in names if n.endswith("_embeddings") or re.search(r"_embeddings_lut\d+$", n)]
    head = [n for n in names if re.search(r"_lm_head(_lut\d+)?$", n)]
    ffn = [n for n in names if "_FFN_PF" in n]
    if not emb or not head or not ffn:
        raise ConfigError(
            f"{directory}: no meta.yaml, and the parts could not be found by name "
            f"(embeddings: {emb or 'none'}, lm_head: {head or 'none'}, FFN_PF: {ffn or 'none'})"
        )
    m = _CHUNK_RE.search(ffn[0])
    return {
        "embeddings": emb[0],
        "lm_head": head[0],
        "ffn": ffn[0],
        "num_chunks": int(m.group(2)) if m else 1,
        "model_prefix": emb[0].split("_embeddings")[0],
    }


def _fn(io: ModelIO, name: str) -> Tuple[Optional[str], Any]:
    """The function `name` of a multifunction file, else the file's only function."""
    if io.multifunction:
        return name, io.function(name)
    return None, io.function(None)


ROTATE_FUNCTIONS = ("infer_rotate", "prefill_rotate")


def _check_functions(io: ModelIO, wanted: List[str], meta_path: Path) -> None:
    """Every function meta.yaml names (its `functions:` list) must be in the file."""
    missing = [f for f in wanted if f not in io.functions]
    if missing:
        raise ConfigError(f"{io.path}: meta.yaml ({meta_path}) lists function(s) {missing} that the file lacks "
                          f"(it has {sorted(io.functions)})")


def _ffn_functions(directory: Path, io: ModelIO, roles: Tuple[str, ...],
                   out: Dict[str, List[ComponentConfig]]) -> None:
    """Append this file's component for each role (function) it has; infer/prefill are required."""
    for role in roles:
        if role in ROTATE_FUNCTIONS and role not in io.functions:
            continue
        if role not in io.functions and io.multifunction:
            raise ConfigError(f"{io.path}: function {role!r} missing (the file has {sorted(io.functions)})")
        function, fio = _fn(io, role)
        out.setdefault(role, []).append(_component(directory, io, function, fio))


def _context_names(params: Dict[str, Any], meta_path: Path) -> Tuple[Dict[str, str], Dict[int, Dict[str, str]]]:
    """Function names: ({role: function} of the full context, {size: {role: function}} of smaller ones).

    Context switching (`state_transition_infer_contexts` in meta.yaml, ANEMLL's multi-context exports) names
    each size's functions by a template, `infer_ctx{context}` by default; otherwise infer/prefill."""
    roles = {"ffn_infer": "infer", "ffn_prefill": "prefill"}
    raw = params.get("state_transition_infer_contexts")
    if not raw:
        return roles, {}
    try:
        sizes = sorted({_positive_int(c, f"{meta_path}: state_transition_infer_contexts") for c in raw})
    except TypeError:
        raise ConfigError(f"{meta_path}: state_transition_infer_contexts must be a list of sizes, got {raw!r}") from None
    templates = {"ffn_infer": str(params.get("state_transition_infer_function_template", "infer_ctx{context}")),
                 "ffn_prefill": str(params.get("state_transition_prefill_function_template", "prefill_ctx{context}"))}
    for role, t in templates.items():
        if "{context}" not in t:
            raise ConfigError(f"{meta_path}: the {role[4:]} function template {t!r} has no {{context}}")
    names = {n: {role: t.replace("{context}", str(n)) for role, t in templates.items()} for n in sizes}
    return names[sizes[-1]], {n: names[n] for n in sizes[:-1]}


def _component(directory: Path, io: ModelIO, function: Optional[str], fio: Any) -> ComponentConfig:
    return ComponentConfig(
        file_path=io.path.relative_to(directory).as_posix(),
        inputs=dict(fio.inputs),
        outputs=dict(fio.outputs),
        states=dict(fio.states),
        functions=sorted(io.functions) if io.multifunction else [],  # protobuf maps have no order
        function=function,
    )


def config_from_anemll_dir(path: Union[str, Path], overrides: Optional[Dict[str, str]] = None) -> ModelConfig:
    """`overrides` replaces meta.yaml's part names (embeddings, ffn, lm_head),
    as chat.py's --embed, --ffn and --lmhead do."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"model directory {str(directory)!r} does not exist")
    directory = directory.resolve()
    meta_path = directory / "meta.yaml"
    info: Dict[str, Any]
    if meta_path.is_file():
        info = read_meta(meta_path)
        params = info["parameters"]
    else:
        params = _discover(directory)
        info = {"parameters": params}
    for key, value in (overrides or {}).items():
        if key not in ("embeddings", "ffn", "lm_head"):
            raise ConfigError(f"part override {key!r}: expected embeddings, ffn or lm_head")
        if value:
            params[key] = value
            if key == "ffn":
                m = _CHUNK_RE.search(_stem(value))
                if m:
                    params["num_chunks"] = int(m.group(2))
    prefix = params.get("model_prefix", "llama")
    num_chunks = params.get("num_chunks", 1)
    listed = list(params.get("functions") or [])
    if str(info.get("model_type", "chunked")) == "monolithic":
        return _monolithic_config(directory, info, params, prefix, listed, meta_path)

    emb_name = params.get("embeddings") or f"{prefix}_embeddings{_lut(params.get('lut_embeddings', 'none'))}"
    head_name = params.get("lm_head") or f"{prefix}_lm_head{_lut(params.get('lut_lmhead', 'none'))}"
    ffn_name = params.get("ffn") or f"{prefix}_FFN_PF{_lut(params.get('lut_ffn', 'none'))}"
    emb_io = read_model_io(_require_part(directory, emb_name, "embeddings", drop_lut=True))
    head_io = read_model_io(_require_part(directory, head_name, "lm_head"))

    # Unified: every chunk file has prefill and infer. Split (older layout):
    # `_FFN_` files for infer beside `_prefill_` files.
    prefill: List[ComponentConfig] = []
    infer: List[ComponentConfig] = []
    chunk_stems = _chunk_names(_stem(ffn_name), num_chunks, directory)
    missing = [s for s in chunk_stems if find_part(directory, s) is None]
    ios: Dict[Path, ModelIO] = {}  # read once, checked again below
    rotate: Dict[str, List[ComponentConfig]] = {}
    names, smaller = _context_names(params, meta_path)
    per_context: Dict[int, Dict[str, List[ComponentConfig]]] = {n: {} for n in smaller}
    if not missing:
        for stem in chunk_stems:
            io = read_model_io(find_part(directory, stem))  # type: ignore[arg-type]
            ios[io.path.resolve()] = io
            wanted = [names["ffn_prefill"], names["ffn_infer"]] + [f for n in smaller.values() for f in n.values()]
            if not set(wanted) <= set(io.functions):
                raise ConfigError(
                    f"{io.path}: FFN chunk must have functions {sorted(set(wanted))}, has {sorted(io.functions)}"
                )
            if not params.get("split_rotate"):  # split files hold the prefill pair elsewhere
                _check_functions(io, listed, meta_path)
            for role, out in (("ffn_prefill", prefill), ("ffn_infer", infer)):
                function, fio = _fn(io, names[role])
                out.append(_component(directory, io, function, fio))
            for n, fns in smaller.items():
                for role, fn_name in fns.items():
                    function, fio = _fn(io, fn_name)
                    per_context[n].setdefault(role, []).append(_component(directory, io, function, fio))
            _ffn_functions(directory, io, ROTATE_FUNCTIONS, rotate)
    else:
        split = _split_chunks(directory, _stem(ffn_name), num_chunks)
        if split is None:
            raise ConfigError(
                f"{directory}: FFN chunk(s) {', '.join(missing)} not found "
                f"(meta.yaml: ffn={ffn_name!r}, num_chunks={num_chunks})"
            )
        prefill, infer = split
    _check_chunk_count(directory, chunk_stems, num_chunks)
    for paths in dict.fromkeys(tuple(directory / c.file_path for c in chunks) for chunks in (infer, prefill)):
        _check_chunk_ranges(directory, list(paths), num_chunks, ios)  # once when both share the files

    # Embeddings and head are called through their default function.
    embeddings = _component(directory, emb_io, None, emb_io.function(None))
    lm_head = _component(directory, head_io, None, head_io.function(None))

    shapes = _shapes(directory, params, embeddings, prefill, infer, lm_head, head_io)
    return _validated(directory, info, params, prefix, shapes, embeddings, lm_head,
                      {"prefill": prefill, "infer": infer, **rotate}, per_context, meta_path)


def _validated(directory: Path, info: Dict[str, Any], params: Dict[str, Any], prefix: str, shapes: Shapes,
               embeddings: Optional[ComponentConfig], lm_head: Optional[ComponentConfig],
               functions: Dict[str, List[ComponentConfig]],
               per_context: Dict[int, Dict[str, List[ComponentConfig]]], meta_path: Path) -> ModelConfig:
    """The validated ModelConfig of a directory; `functions` maps function names to their chunks."""
    config = ModelConfig(
        model_info=_model_info(directory, info, params, prefix),
        shapes=shapes,
        embeddings=embeddings,
        ffn_prefill=functions.get("prefill", []),
        ffn_infer=functions["infer"],
        ffn_infer_rotate=functions.get("infer_rotate"),
        ffn_prefill_rotate=functions.get("prefill_rotate"),
        lm_head=lm_head,
        model_dir=directory,
        context_functions=per_context,
    )
    config.validate()
    if meta_path.is_file():
        _check_meta_against_files(meta_path, params, config)
    return config


def _model_info(directory: Path, info: Dict[str, Any], params: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    model_info = {
        "model_id": info.get("name", directory.name),
        "path": str(directory),
        "model_type": info.get("architecture", prefix),
        "anemll_version": str(info.get("version", "")),
        "parameters": params,
    }
    if "model_type" in info:
        model_info["layout"] = str(info["model_type"])
    for key in ("vocab_size", "lm_head_chunk_sizes", "argmax_in_model", "state_length",
                "update_mask_prefill", "prefill_dynamic_slice", "sliding_window", "attention_size"):
        if key in params:
            model_info[key] = params[key]
    return model_info


def _monolithic_config(directory: Path, info: Dict[str, Any], params: Dict[str, Any], prefix: str,
                       listed: List[str], meta_path: Path) -> ModelConfig:
    """ANEMLL 0.3.5 `model_type: monolithic`: one file with infer/prefill (and rotate) taking input_ids."""
    name = params.get("monolithic_model") or f"{prefix}_monolithic_full{_lut(params.get('lut_bits', 'none'))}"
    io = read_model_io(_require_part(directory, name, "monolithic_model"))
    _check_functions(io, listed, meta_path)
    parts: Dict[str, List[ComponentConfig]] = {}
    names, smaller = _context_names(params, meta_path)
    for role, fn_name in names.items():
        if fn_name in io.functions or not io.multifunction:
            function, fio = _fn(io, fn_name)
            parts[role[4:]] = [_component(directory, io, function, fio)]
    if "infer" not in parts:
        raise ConfigError(f"{io.path}: a monolithic model needs function {names['ffn_infer']!r} "
                          f"(has {sorted(io.functions)})")
    _ffn_functions(directory, io, ROTATE_FUNCTIONS, parts)
    per_context: Dict[int, Dict[str, List[ComponentConfig]]] = {}
    for n, fns in smaller.items():
        for role, fn_name in fns.items():
            if fn_name not in io.functions:
                raise ConfigError(f"{io.path}: function {fn_name!r} of context {n} missing (has {sorted(io.functions)})")
            function, fio = _fn(io, fn_name)
            per_context.setdefault(n, {})[role] = [_component(directory, io, function, fio)]
    infer = parts["infer"][0]
    where = str(directory)
    mask = infer.inputs.get("causal_mask")
    ids = infer.inputs.get("input_ids")
    if mask is None or ids is None:
        raise ConfigError(f"{io.path}: function 'infer' of a monolithic model needs inputs input_ids and causal_mask")
    prefill = parts.get("prefill", [])
    batch = prefill[0].inputs["input_ids"].shape[-1] if prefill and "input_ids" in prefill[0].inputs else 1
    vocab = _vocab_size(params, infer, io, where)
    # Monolithic models pass no hidden states between parts: hidden_size is not observable and unused.
    shapes = Shapes(batch_size=batch, context_length=mask.shape[-1], hidden_size=1, vocab_size=vocab)
    return _validated(directory, info, params, prefix, shapes, None, None, parts, per_context, meta_path)


def _check_meta_against_files(meta_path: Path, params: Dict[str, Any], config: ModelConfig) -> None:
    """meta.yaml's sizes must be those of the model files: ANEMLL's runner feeds
    the models buffers of meta.yaml's sizes, so a contradiction fails or, worse,
    runs wrong. Named: the field, both values and the file."""
    s = config.shapes
    ffn = config.ffn_prefill[0] if config.ffn_prefill else config.ffn_infer[0]
    head = config.head.file_path  # type: ignore[union-attr]  (a monolithic model's infer holds the head)
    checks = [
        ("context_length", s.context_length, f"{config.ffn_infer[0].file_path} (causal_mask's last dimension)"),
        ("batch_size", s.batch_size, f"{ffn.file_path} (prefill hidden_states)"),
        ("split_lm_head", config.logits_parts, f"{head} (its logits outputs)" if not config.argmax_in_model
         else f"{head} (argmax_idx)"),
    ]
    if not config.argmax_in_model:
        checks.append(("vocab_size", s.vocab_size, f"{head} (its logits outputs)"))
    for key, actual, source in checks:
        if key in params and params[key] is not None:
            given = _positive_int(params[key], f"{meta_path}: model_info.parameters.{key}")
            if given != actual:
                raise ConfigError(f"{meta_path}: model_info.parameters.{key} is {given}, but the model files say "
                                  f"{actual}: {source}")
    sizes = params.get("lm_head_chunk_sizes")
    if sizes is not None and not config.argmax_in_model:
        if not isinstance(sizes, list):
            raise ConfigError(f"{meta_path}: model_info.parameters.lm_head_chunk_sizes must be a list, got {sizes!r}")
        given_sizes = [_positive_int(x, f"{meta_path}: model_info.parameters.lm_head_chunk_sizes") for x in sizes]
        if given_sizes != config.lm_head_chunk_sizes:
            raise ConfigError(f"{meta_path}: model_info.parameters.lm_head_chunk_sizes is {given_sizes}, but the "
                              f"model files say {config.lm_head_chunk_sizes}: {head} (its logits outputs)")
    # The parts' own metadata: ANEMLL's runner lets meta.yaml win, so only a warning.
    for comp in [*config.ffn_infer[:1], *([config.lm_head] if config.lm_head is not None else [])]:
        io = read_model_io(config.path_of(comp))  # type: ignore[arg-type]
        for key, actual in (("context_length", s.context_length), ("batch_size", s.batch_size)):
            value = io.metadata.get(f"com.anemll.{key}")
            if value is not None and str(value).strip() != str(actual):
                log.warning("%s: metadata com.anemll.%s is %s, but meta.yaml and the model's shapes say %s "
                            "(meta.yaml wins, as in ANEMLL)", io.path, key, value, actual)


def _split_chunks(
    directory: Path, ffn_stem: str, num_chunks: int
) -> Optional[Tuple[List[ComponentConfig], List[ComponentConfig]]]:
    base = _CHUNK_RE.sub("", ffn_stem)
    if "_FFN_PF" not in base:
        return None
    infer_base = base.replace("_FFN_PF", "_FFN")
    prefill_base = base.replace("_FFN_PF", "_prefill")
    prefill, infer = [], []
    for stem_base, function, out in ((prefill_base, "prefill", prefill), (infer_base, "infer", infer)):
        for stem in _chunk_names(stem_base, num_chunks, directory):
            found = find_part(directory, stem)
            if found is None:
                return None
            io = read_model_io(found)
            fn, fio = _fn(io, function) if io.multifunction and function in io.functions else (None, io.function(None))
            out.append(_component(directory, io, fn, fio))
    return prefill, infer


def _check_chunk_count(directory: Path, chunk_stems: List[str], num_chunks: int) -> None:
    if len(chunk_stems) != num_chunks:
        return
    m = _CHUNK_RE.search(chunk_stems[0])
    if not m:
        return
    base = _CHUNK_RE.sub("", chunk_stems[0])
    others = {
        int(mm.group(2))
        for p in directory.glob(f"{base}_chunk_*")
        for mm in [_CHUNK_RE.search(_stem(p.name))]
        if mm
    }
    if others - {num_chunks}:
        raise ConfigError(
            f"{directory}/meta.yaml: num_chunks is {num_chunks} but chunk files of "
            f"{sorted(others)} chunks are present"
        )


def _meta_int(io: ModelIO, key: str) -> Optional[int]:
    value = io.metadata.get(f"com.anemll.{key}")
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{io.path}: metadata com.anemll.{key} is {value!r}, not an integer") from None


def _weights_fingerprint(path: Path) -> Optional[Tuple[int, str]]:
    """Size and a hash of the program and of the start, middle and end of the
    weight file of a part: enough to tell a copied chunk, reading 3 MiB."""
    import hashlib

    h = hashlib.sha256()
    if (path / "model.mil").is_file():
        h.update((path / "model.mil").read_bytes())
    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if spec_path.is_file():
        from coremltools.proto import Model_pb2

        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec.description.metadata.Clear()  # the program, not what is said about it
        h.update(spec.SerializeToString(deterministic=True))
    for rel in ("weights/weight.bin", "Data/com.apple.CoreML/weights/weight.bin"):
        weights = path / rel
        if weights.is_file():
            size = weights.stat().st_size
            with open(weights, "rb") as f:
                for at in sorted({0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))}):
                    f.seek(at)
                    h.update(f.read(1 << 20))
            return size, h.hexdigest()
    return None


def _check_chunk_ranges(directory: Path, paths: List[Path], num_chunks: int, ios: Dict[Path, ModelIO]) -> None:
    """Each chunk file holds its own layer range: chunk i of n by its name
    (`_chunk_02of04`), by ANEMLL's metadata (com.anemll.chunk_no, num_chunks)
    and, where the converter recorded them, its layers (first_layer,
    num_layers); and no two chunks carry the same weights (a copied file
    renamed would run one range twice and skip another, writing wrong text)."""
    if len(paths) < 2 and num_chunks < 2:
        return
    ranges = []
    seen: Dict[Tuple[int, str], Path] = {}
    for i, path in enumerate(paths, start=1):
        io = ios.get(path.resolve()) or read_model_io(path)
        where = f"{directory}: FFN chunk {path.name}"
        m = _CHUNK_RE.search(_stem(path.name))
        if m and (int(m.group(1)), int(m.group(2))) != (i, num_chunks):
            raise ConfigError(f"{where}: its name says chunk {int(m.group(1))} of {int(m.group(2))}, "
                              f"but it is loaded as chunk {i} of {num_chunks}")
        chunk_no, total = _meta_int(io, "chunk_no"), _meta_int(io, "num_chunks")
        if chunk_no is not None and chunk_no != i:
            raise ConfigError(f"{where}: its metadata (com.anemll.chunk_no) says it is chunk {chunk_no}, "
                              f"but it is loaded as chunk {i} of {num_chunks}: a copy of chunk {chunk_no}? "
                              f"The layer range of chunk {i} would be missing and that of chunk {chunk_no} "
                              "run twice")
        if total is not None and total != num_chunks:
            raise ConfigError(f"{where}: its metadata (com.anemll.num_chunks) says {total} chunks, "
                              f"meta.yaml and the file names say {num_chunks}")
        first, count = _meta_int(io, "first_layer"), _meta_int(io, "num_layers")
        ranges.append((first, count, path.name))
        fingerprint = _weights_fingerprint(path)
        if fingerprint is not None:
            if fingerprint in seen:
                raise ConfigError(f"{where}: has the very weights of {seen[fingerprint].name}: a copy? "
                                  "Each chunk must hold its own layer range")
            seen[fingerprint] = path
    if all(f is not None and c is not None for f, c, _ in ranges):
        expected = 0
        for first, count, name in ranges:
            if first != expected:
                what = "overlaps the previous chunk's" if first < expected else "leaves out layers"
                raise ConfigError(f"{directory}: FFN chunk {name} starts at layer {first}, expected {expected}: "
                                  f"its range {what} (com.anemll.first_layer / num_layers)")
            expected = first + count


def _shapes(
    directory: Path,
    params: Dict[str, Any],
    embeddings: ComponentConfig,
    prefill: List[ComponentConfig],
    infer: List[ComponentConfig],
    lm_head: ComponentConfig,
    head_io: ModelIO,
) -> Shapes:
    where = f"{directory}"
    mask = infer[0].inputs.get("causal_mask") or prefill[0].inputs.get("causal_mask")
    if mask is None:
        raise ConfigError(f"{where}: FFN chunk {infer[0].file_path} has no causal_mask input")
    context = mask.shape[-1]  # the state may be longer than the context
    hidden = prefill[0].inputs.get("hidden_states")
    if hidden is None:
        raise ConfigError(f"{where}: FFN chunk {prefill[0].file_path} has no hidden_states input")
    batch = hidden.shape[-2] if len(hidden.shape) >= 2 else 1  # 1: sequential prefill
    hidden_size = hidden.shape[-1]
    vocab = _vocab_size(params, lm_head, head_io, where)
    return Shapes(batch_size=batch, context_length=context, hidden_size=hidden_size, vocab_size=vocab)


def _vocab_size(params: Dict[str, Any], lm_head: ComponentConfig, head_io: ModelIO, where: str) -> int:
    parts = [s for n, s in lm_head.outputs.items() if re.match(r"^logits\d*$", n)]
    if parts:
        return sum(s.shape[-1] for s in parts)
    for source in (params, head_io.metadata):
        for key in ("vocab_size", "com.anemll.vocab_size"):
            if key in source:
                return _positive_int(source[key], f"{where}: {key}")
        for key in ("lm_head_chunk_sizes", "com.anemll.lm_head_chunk_sizes"):
            if key in source:
                sizes = source[key]
                if isinstance(sizes, str):
                    sizes = re.findall(r"\d+", sizes)
                return sum(_positive_int(s, f"{where}: {key}") for s in sizes)
    raise ConfigError(
        f"{where}: lm_head {lm_head.file_path} has no logits outputs and meta.yaml gives no vocab_size"
    )
