"""Parser of the model.mil text inside a compiled .mlmodelc, into our IR.

Handles: program(x.y) with a [buildInfo = dict<...>(...)] attribute, several `func name<iosNN>(...)`
blocks, typed scalars (incl. hex floats like fp16(0x1.0p-3)) and tensors, BLOBFILE(path, offset)
references, state<tensor<...>> arguments, variadic `(a, b)` arguments, tuple returns, both name
syntaxes ([name = string("x")] and [name = tensor<string, []>("x")]), dict/tuple/string attributes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.gc_pause import gc_paused
from anemll_fast.mil.blobfile import BlobCache, BlobRef, resolve_blob_path
from anemll_fast.mil.errors import MilFormatError
from anemll_fast.mil.program import (
    NUMPY_DTYPES, FeatureSpec, Function, FunctionSpec, Op, OtherType, Program, StateType, TensorType,
    Value, Var,
)

# One match per token, with the whitespace and comments before it: half the
# matches of a separate whitespace token (parsing time is mostly per token).
_TOKEN = re.compile(r"""(?:\s+|//[^\n]*)*(?:
    ([A-Za-z_@][A-Za-z0-9_.@/]*)
  | ([()\[\]{}<>,=;?])
  | ([-+]?(?:0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*(?:[pP][-+]?\d+)?|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|[-+](?:inf|nan)\b)
  | ("(?:[^"\\]|\\.)*")
  | (->)
)""", re.VERBOSE)  # the most frequent kinds first
_KINDS = (None, "id", "punct", "num", "str", "arrow")  # by group number
_TRAILER = re.compile(r"(?:\s+|//[^\n]*)*")

_SCALAR_TYPES = set(NUMPY_DTYPES)
_MAX_DEPTH = 64


class _Tok:
    __slots__ = ("kind", "text", "pos")

    def __init__(self, kind: str, text: str, pos: int):
        self.kind, self.text, self.pos = kind, text, pos


def tokenize(text: str, source: str) -> List[_Tok]:
    toks: List[_Tok] = []
    append = toks.append
    end = 0
    for m in _TOKEN.finditer(text):
        if m.start() != end:
            break  # an unexpected character between tokens
        k = m.lastindex
        append(_Tok(_KINDS[k], m.group(k), m.start(k)))
        end = m.end()
    end = _TRAILER.match(text, end).end()
    if end != len(text):
        line = text.count("\n", 0, end) + 1
        raise MilFormatError(f"{source}: line {line}: unexpected character {text[end]!r}")
    toks += [_Tok("eof", "", len(text))] * 3  # so that peek(k) needs no bounds check
    return toks


class _Parser:
    def __init__(self, text: str, source: str, model_dir: str, blobs: Optional[BlobCache],
                 read_weights: bool = True):
        self.read_weights = read_weights
        self.text = text
        self.source = source
        self.model_dir = model_dir
        self.blobs = blobs
        self.toks = tokenize(text, source)
        self.i = 0
        self.depth = 0

    # -- token helpers
    def error(self, msg: str, tok: Optional[_Tok] = None) -> MilFormatError:
        tok = tok or self.toks[self.i]
        line = self.text.count("\n", 0, tok.pos) + 1
        col = tok.pos - (self.text.rfind("\n", 0, tok.pos) + 1) + 1
        got = tok.text if tok.kind != "eof" else "end of file"
        return MilFormatError(f"{self.source}: line {line}, column {col}: {msg} (at {got!r})")

    # The hottest code of a load (called per token): kept to plain indexing.
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[self.i + k]  # k <= 2: the token list ends with three eof tokens

    def next(self) -> _Tok:
        t = self.toks[self.i]
        if t.kind != "eof":
            self.i += 1
        return t

    def accept(self, text: str) -> bool:
        t = self.toks[self.i]
        if t.text == text and t.kind != "str":
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        t = self.toks[self.i]
        if t.text != text or t.kind == "str":
            raise self.error(f"expected {text!r}")
        if t.kind != "eof":
            self.i += 1
        return t

    def ident(self, what: str = "a name") -> str:
        t = self.peek()
        if t.kind != "id":
            raise self.error(f"expected {what}")
        return self.next().text

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error("nesting too deep")

    # -- program
    def program(self, default_function: Optional[str]) -> Program:
        self.expect("program")
        self.expect("(")
        ver = self.next()
        if ver.kind != "num":
            raise self.error("expected a program version", ver)
        self.expect(")")
        attrs = self.attributes() if self.peek().text == "[" else {}
        self.expect("{")
        functions: Dict[str, Function] = {}
        while not self.accept("}"):
            fn = self.function()
            if fn.name in functions:
                raise self.error(f"function {fn.name!r} defined twice")
            functions[fn.name] = fn
        if self.peek().kind != "eof":
            raise self.error("text after the end of the program")
        if not functions:
            raise MilFormatError(f"{self.source}: the program has no functions")
        default = default_function if default_function in functions else (
            "main" if "main" in functions else next(iter(functions)))
        return Program(functions, default, source=self.source, version=ver.text, attributes=attrs)

    def attributes(self) -> Dict[str, Value]:
        self.expect("[")
        attrs: Dict[str, Value] = {}
        if not self.accept("]"):
            while True:
                key = self.ident("an attribute name")
                self.expect("=")
                attrs[key] = self.typed_literal()
                if self.accept("]"):
                    break
                self.expect(",")
        return attrs

    def function(self) -> Function:
        self.expect("func")
        name = self.ident("a function name")
        opset = ""
        if self.accept("<"):
            opset = self.ident("an opset")
            self.expect(">")
        self.expect("(")
        inputs: List[Var] = []
        if not self.accept(")"):
            while True:
                t = self.type_()
                inputs.append(Var(self.ident("an input name"), t))
                if self.accept(")"):
                    break
                self.expect(",")
        attrs = self.attributes() if self.peek().text == "[" else {}
        self.expect("{")
        ops: List[Op] = []
        while not self.accept("}"):
            ops.append(self.statement())
        self.expect("->")
        self.expect("(")
        outputs: List[str] = []
        if not self.accept(")"):
            while True:
                outputs.append(self.ident("an output name"))
                if self.accept(")"):
                    break
                self.expect(",")
        self.expect(";")
        defined = {v.name for v in inputs} | {v.name for op in ops for v in op.outputs}
        for out in outputs:
            if out not in defined:
                raise MilFormatError(f"{self.source}: function {name!r} returns {out!r}, which is never defined")
        return Function(name, inputs, ops, outputs, opset=opset, attributes=attrs)

    def statement(self) -> Op:
        outs: List[Var] = []
        if self.peek().kind == "id" and self.peek(1).text == "(" and self.peek().text not in _SCALAR_TYPES:
            return self._op_call(outs)  # an op without outputs, e.g. write_state(...)
        paren = self.accept("(")
        while True:
            t = self.type_()
            outs.append(Var(self.ident("a variable name"), t))
            if not self.accept(","):
                break
        if paren:
            self.expect(")")
        self.expect("=")
        return self._op_call(outs)

    def _op_call(self, outs: List[Var]) -> Op:
        op_type = self.ident("an op type")
        self.expect("(")
        inputs: Dict[str, List[Any]] = {}
        if not self.accept(")"):
            while True:
                pname = self.ident("a parameter name")
                self.expect("=")
                if pname in inputs:
                    raise self.error(f"parameter {pname!r} given twice")
                inputs[pname] = self.argument()
                if self.accept(")"):
                    break
                self.expect(",")
        attrs = self.attributes() if self.peek().text == "[" else {}
        self.expect(";")
        name = attrs.get("name")
        op = Op(op_type, inputs, outs, attrs, name.data if name is not None and isinstance(name.data, str) else "")
        if op_type == "const" and ("val" not in attrs or len(outs) != 1):
            raise self.error("a const needs one output and a val")
        return op

    def argument(self) -> List[Any]:
        if self.accept("("):  # variadic: (a, b, c)
            items: List[Any] = []
            if not self.accept(")"):
                while True:
                    items.append(self.single_argument())
                    if self.accept(")"):
                        break
                    self.expect(",")
            return items
        return [self.single_argument()]

    def single_argument(self) -> Any:
        t, nxt = self.peek(), self.peek(1)
        if t.kind == "id" and ((t.text in _SCALAR_TYPES and nxt.text == "(") or
                               (t.text in ("tensor", "dict", "list", "tuple", "state") and nxt.text == "<")):
            return self.typed_literal()
        return self.ident("a variable or a value")

    # -- types
    def type_(self) -> Any:
        self._enter()
        try:
            t = self.peek()
            name = self.ident("a type")
            if name == "tensor":
                self.expect("<")
                dtype = self.ident("a dtype")
                if dtype not in _SCALAR_TYPES:
                    raise self.error(f"unknown dtype {dtype!r}", t)
                self.expect(",")
                shape = self.shape()
                self.expect(">")
                return TensorType(dtype, shape)
            if name == "state":
                self.expect("<")
                inner = self.type_()
                self.expect(">")
                if not isinstance(inner, TensorType):
                    raise self.error("state<> must wrap a tensor", t)
                return StateType(inner)
            if name in ("dict", "list", "tuple"):
                start = t.pos
                self.expect("<")
                level = 1
                while level:
                    tok = self.next()
                    if tok.kind == "eof":
                        raise self.error("unterminated type")
                    level += (tok.text == "<") - (tok.text == ">")
                return OtherType(self.text[start:self.toks[self.i - 1].pos + 1])
            if name in _SCALAR_TYPES:
                return TensorType(name, ())
            raise self.error(f"unknown type {name!r}", t)
        finally:
            self.depth -= 1

    def shape(self) -> Optional[Tuple[Optional[int], ...]]:
        if self.accept("?"):
            return None
        self.expect("[")
        dims: List[Optional[int]] = []
        if not self.accept("]"):
            while True:
                t = self.next()
                if t.text == "?" or t.kind == "id":
                    dims.append(None)  # flexible or symbolic dimension
                elif t.kind == "num" and re.fullmatch(r"\d+", t.text):
                    if len(t.text) > 18 and int(t.text) >= 1 << 63:
                        raise self.error(f"dimension {t.text} does not fit 64 bits", t)
                    dims.append(int(t.text))
                else:
                    raise self.error("expected a dimension", t)
                if self.accept("]"):
                    break
                self.expect(",")
        return tuple(dims)

    # -- literals
    def typed_literal(self) -> Value:
        start = self.peek()
        t = self.type_()
        self.expect("(")
        if isinstance(t, TensorType) and self.peek().text == "BLOBFILE":
            data = self.blobfile(t, start)
        else:
            raw = self.literal() if self.peek().text != ")" else []
            data = self.convert(t, raw, start)
        self.expect(")")
        return Value(t, data)

    def blobfile(self, t: TensorType, start: _Tok) -> np.ndarray:
        self.expect("BLOBFILE")
        self.expect("(")
        fields: Dict[str, Any] = {}
        while True:
            key = self.ident("path or offset")
            self.expect("=")
            fields[key] = self.typed_literal().data
            if self.accept(")"):
                break
            self.expect(",")
        if "path" not in fields or "offset" not in fields:
            raise self.error("BLOBFILE needs path and offset", start)
        if t.shape is None or None in t.shape:
            raise self.error("a weight blob needs a static shape", start)
        if not isinstance(fields["path"], str):
            raise self.error("BLOBFILE path must be a string", start)
        try:
            offset = int(np.asarray(fields["offset"]).item())
        except (ValueError, TypeError) as e:
            raise self.error(f"bad BLOBFILE offset ({e})", start) from e
        path = resolve_blob_path(fields["path"], self.model_dir, self.source)
        if not self.read_weights:
            return BlobRef(path, offset, t.dtype, tuple(t.shape))
        return self.blobs.reader(path).read(offset, t.dtype, tuple(t.shape))

    def literal(self) -> Any:
        self._enter()
        try:
            t = self.peek()
            if t.kind == "str":
                self.next()
                return _unquote(t.text)
            if t.kind == "num":
                self.next()
                try:
                    return _number(t.text)
                except (ValueError, OverflowError) as e:
                    raise self.error(f"bad number ({e})", t) from e
            if t.kind == "id" and t.text in ("true", "false"):
                self.next()
                return t.text == "true"
            if t.kind == "id" and t.text in ("inf", "nan"):
                self.next()
                return float(t.text)
            if t.kind == "id" and self.peek(1).text in ("(", "<"):
                return self.typed_literal().data
            if self.accept("["):
                return self._items("]", list)
            if self.accept("("):
                return self._items(")", tuple)
            if self.accept("{"):
                pairs = self._items("}", list)
                out: Dict[Any, Any] = {}
                for p in pairs:
                    if not isinstance(p, _Pair):
                        raise self.error("expected {key, value} pairs in a dict", t)
                    out[p.key] = p.value
                return out
            raise self.error("expected a value")
        finally:
            self.depth -= 1

    def _items(self, close: str, kind: type) -> Any:
        items: List[Any] = []
        if self.accept(close):
            return kind(items)
        while True:
            if close == "}" and self.accept("{"):
                k = self.literal()
                self.expect(",")
                v = self.literal()
                self.expect("}")
                items.append(_Pair(k, v))
            else:
                items.append(self.literal())
            if self.accept(close):
                return kind(items)
            self.expect(",")

    def convert(self, t: Any, raw: Any, tok: _Tok) -> Any:
        if not isinstance(t, TensorType):
            return raw  # dict / tuple / list attribute: plain python data
        if t.dtype == "string":
            if t.shape == () or t.shape is None:
                if isinstance(raw, list) and len(raw) == 1:
                    raw = raw[0]
                if not isinstance(raw, str):
                    raise self.error("expected a string", tok)
                return raw
            return np.array(_flatten(raw), dtype=object).reshape(t.shape)
        flat = _flatten(raw)
        if t.shape is None or None in t.shape:
            raise self.error("a constant needs a static shape", tok)
        count = int(np.prod(t.shape)) if t.shape else 1
        if len(flat) != count:
            raise self.error(f"{t} needs {count} values, got {len(flat)}", tok)
        if any(isinstance(v, (str, list, tuple, dict)) for v in flat):
            raise self.error(f"non-numeric value in a {t.dtype} constant", tok)
        try:
            with np.errstate(over="ignore"):
                arr = np.array(flat, dtype=np.float64 if t.dtype in ("fp16", "fp32", "fp64", "bf16")
                               else object).astype(NUMPY_DTYPES[t.dtype])
        except (OverflowError, ValueError, TypeError) as e:
            raise self.error(f"bad {t.dtype} value ({e})", tok) from e
        return arr.reshape(t.shape)


class _Pair:
    __slots__ = ("key", "value")

    def __init__(self, key: Any, value: Any):
        self.key, self.value = key, value


def _flatten(raw: Any) -> List[Any]:
    if isinstance(raw, (list, tuple)):
        out: List[Any] = []
        for r in raw:
            out.extend(_flatten(r))
        return out
    if isinstance(raw, np.ndarray):
        return list(raw.reshape(-1))
    return [raw]


def _unquote(s: str) -> str:
    try:
        return json.loads(s)
    except ValueError:
        return s[1:-1]


def _number(s: str) -> Any:
    body = s.lstrip("+-")
    if body in ("inf", "nan"):
        return float(s)
    if body[:2] in ("0x", "0X"):
        try:
            return float.fromhex(s) if ("p" in s.lower() or "." in s) else int(s, 16)
        except ValueError:
            return float.fromhex(s + "p0")
    if re.fullmatch(r"[-+]?\d+", s):
        return int(s)
    return float(s)


def parse_mil_text(text: str, source: str = "model.mil", model_dir: str = ".",
                   blobs: Optional[BlobCache] = None, default_function: Optional[str] = None,
                   read_weights: bool = True) -> Program:
    """Parse model.mil text. BLOBFILE paths resolve under model_dir (the .mlmodelc directory);
    with read_weights=False they stay unread BlobRefs (structure only, e.g. op histograms)."""
    own = blobs is None
    cache = BlobCache() if own else blobs
    # A model.mil of a 135M model is ~400k tokens and ~1M small objects, none
    # in reference cycles: with the cyclic GC running, its passes over the
    # growing heap took half the load time (measured: benchmarks/bench_mil_load.py).
    try:
        with gc_paused():
            return _Parser(text, source, model_dir, cache, read_weights).program(default_function)
    except RecursionError as e:
        raise MilFormatError(f"{source}: nesting too deep") from e
    finally:
        if own:
            cache.close()


def load_mlmodelc(path: str, read_weights: bool = True) -> Program:
    mil = os.path.join(path, "model.mil")
    try:
        with open(mil, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MilFormatError(f"{mil}: cannot read model.mil ({e})") from e
    meta = _read_metadata(path)
    default = meta.get("defaultFunctionName") if isinstance(meta.get("defaultFunctionName"), str) else None
    program = parse_mil_text(text, source=path, model_dir=path, default_function=default,
                             read_weights=read_weights)
    program.specs = _specs_from_metadata(program, meta)
    user = meta.get("userDefinedMetadata")
    if isinstance(user, dict):
        program.metadata = {str(k): str(v) for k, v in user.items()}
    return program


def _read_metadata(path: str) -> Dict[str, Any]:
    """metadata.json of an .mlmodelc (a one-element list of dicts), or {} when absent."""
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        return {}
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise MilFormatError(f"{meta_path}: not valid JSON ({e})") from e
    if isinstance(meta, list):
        meta = meta[0] if meta and isinstance(meta[0], dict) else {}
    return meta if isinstance(meta, dict) else {}


def _shape_list(v: Any) -> Optional[List[Any]]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    return v if isinstance(v, list) else None


def _parse_flexibility(text: Any, rank: int) -> Tuple[Optional[List[List[int]]], Optional[List[List[int]]]]:
    """coremlc's `shapeFlexibility` string: "1 × 1 | 1 × 64" (enumerated) or
    "1 × 1...2048" (per-dim ranges; `...` without a bound is unbounded)."""
    if not isinstance(text, str) or not text.strip():
        return None, None
    if "..." in text:
        dims = [d.strip() for d in re.split(r"[×x]", text)]
        if len(dims) != rank:
            return None, None
        ranges = []
        for d in dims:
            lo, sep, hi = d.partition("...")
            try:
                if not sep:
                    ranges.append([int(lo), int(lo)])
                else:
                    ranges.append([int(lo), int(hi) if hi.strip() else -1])
            except ValueError:
                return None, None
        return None, ranges
    shapes = []
    for part in text.split("|"):
        dims = [d.strip() for d in re.split(r"[×x]", part) if d.strip()]
        if len(dims) != rank or not all(d.isdigit() for d in dims):
            return None, None
        shapes.append([int(d) for d in dims])
    return (shapes if len(shapes) > 1 else None), None


def _specs_from_metadata(program: Program, meta: Dict[str, Any]) -> Dict[str, FunctionSpec]:
    """Refine the signature's input specs with flexible shapes recorded in metadata.json."""
    schemas: Dict[str, List[Dict[str, Any]]] = {}
    funcs = meta.get("functions")
    if isinstance(funcs, list):
        for f in funcs:
            if isinstance(f, dict) and isinstance(f.get("name"), str):
                schemas[f["name"]] = f.get("inputSchema") or []
    elif isinstance(meta.get("inputSchema"), list):
        schemas[program.default_function] = meta["inputSchema"]
    specs: Dict[str, FunctionSpec] = {}
    for name in program.functions:
        sig = program.signature_spec(name)
        by_name = {d.get("name"): d for d in schemas.get(name, []) if isinstance(d, dict)}
        ins = []
        for s in sig.inputs:
            d = by_name.get(s.name, {})
            enum = _shape_list(d.get("enumeratedShapes"))
            rng = _shape_list(d.get("shapeRange"))
            if not enum and not rng:
                enum, rng = _parse_flexibility(d.get("shapeFlexibility"), len(s.shape))
            if enum and all(isinstance(e, list) and len(e) == len(s.shape) for e in enum):
                s = FeatureSpec(s.name, s.dtype, s.shape, [tuple(int(x) for x in e) for e in enum])
            elif rng and len(rng) == len(s.shape) and all(isinstance(r, list) and len(r) == 2 for r in rng):
                s = FeatureSpec(s.name, s.dtype, s.shape, None, [(int(a), int(b)) for a, b in rng])
            ins.append(s)
        specs[name] = FunctionSpec(ins, sig.outputs, sig.states)
    return specs
