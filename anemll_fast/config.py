"""ModelConfig: the declarative description of a multi-component ANEMLL model.

The JSON schema follows the one of the ANEMLL / candle-coreml ecosystem
(`model_info`, `shapes`, `components`, `ffn_execution`), extended for what real
ANEMLL models have: several FFN chunks (a component may be a list of chunks),
KV-cache states, LM heads split into N logits parts, heads with in-model
argmax, and optional `update_mask` inputs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from anemll_fast.errors import ConfigError

# Canonical data type names and the numpy type of each.
DTYPES: Dict[str, Any] = {
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "FLOAT64": np.float64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}

# Spellings met in the wild (Core ML metadata.json, MIL text, numpy) -> canonical.
_DTYPE_ALIASES = {
    "FP16": "FLOAT16", "HALF": "FLOAT16", "F16": "FLOAT16",
    "FP32": "FLOAT32", "FLOAT": "FLOAT32", "F32": "FLOAT32",
    "FP64": "FLOAT64", "DOUBLE": "FLOAT64", "F64": "FLOAT64",
    "INT": "INT32", "I32": "INT32", "I16": "INT16", "I8": "INT8", "U8": "UINT8",
}

COMPONENT_ROLES = ("embeddings", "ffn_prefill", "ffn_infer", "ffn_infer_rotate", "ffn_prefill_rotate", "lm_head")
FFN_ROLES = ("ffn_prefill", "ffn_infer")
# Sliding-window models (ANEMLL 0.3.5 Gemma 3): the functions that shift the local KV cache.
ROTATE_ROLES = ("ffn_infer_rotate", "ffn_prefill_rotate")
FFN_EXECUTIONS = ("split", "unified")

_LOGITS_RE = re.compile(r"^logits(\d+)$")
_INT_LIST_RE = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")


def canonical_dtype(value: Any, where: str = "data_type") -> str:
    """Normalise a data type spelling; raise ConfigError naming `where` if unknown."""
    if isinstance(value, type) or isinstance(value, np.dtype):
        try:
            value = np.dtype(value).name
        except TypeError:
            pass
    if not isinstance(value, str):
        raise ConfigError(f"{where}: data type must be a string, got {value!r}")
    key = value.strip().upper()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ConfigError(
            f"{where}: unknown data type {value!r} (known: {', '.join(DTYPES)})"
        )
    return key


def _shape(value: Any, where: str) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: shape must be a non-empty list of integers, got {value!r}")
    out = []
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise ConfigError(f"{where}: shape must hold integers, got {value!r}")
        out.append(int(dim))
    return tuple(out)


@dataclass
class TensorSpec:
    """One input, output or state of a model function."""

    name: str
    shape: Tuple[int, ...]
    data_type: str
    # Other shapes the model also accepts (Core ML enumerated shapes), e.g. the
    # embeddings' [1, 1] beside [1, batch].
    enumerated_shapes: Tuple[Tuple[int, ...], ...] = ()

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.data_type])

    @property
    def all_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        shapes = [tuple(self.shape)]
        shapes += [tuple(s) for s in self.enumerated_shapes if tuple(s) != tuple(self.shape)]
        return tuple(shapes)

    def same_spec(self, other: "TensorSpec") -> bool:
        return (
            self.name == other.name
            and tuple(self.shape) == tuple(other.shape)
            and self.data_type == other.data_type
        )

    def describe(self) -> str:
        text = f"{self.name}: {self.data_type} {list(self.shape)}"
        if self.enumerated_shapes:
            text += " (also " + ", ".join(str(list(s)) for s in self.all_shapes[1:]) + ")"
        return text

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "data_type": self.data_type,
        }
        if self.enumerated_shapes:
            out["enumerated_shapes"] = [list(s) for s in self.enumerated_shapes]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str, key: Optional[str] = None) -> "TensorSpec":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object with name/shape/data_type, got {data!r}")
        name = data.get("name", key)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: missing field 'name'")
        if key is not None and name != key:
            raise ConfigError(f"{where}: field 'name' is {name!r} but the entry is keyed {key!r}")
        if "shape" not in data:
            raise ConfigError(f"{where}.shape: missing field 'shape'")
        if "data_type" not in data:
            raise ConfigError(f"{where}.data_type: missing field 'data_type'")
        shape = _shape(data["shape"], f"{where}.shape")
        dtype = canonical_dtype(data["data_type"], f"{where}.data_type")
        enumerated = tuple(
            _shape(s, f"{where}.enumerated_shapes") for s in data.get("enumerated_shapes", ())
        )
        return cls(name=name, shape=shape, data_type=dtype, enumerated_shapes=enumerated)


def _specs_from(data: Any, where: str) -> Dict[str, TensorSpec]:
    """Reads {name: spec} (candle-coreml style) or [spec, ...]."""
    if data is None:
        return {}
    specs: Dict[str, TensorSpec] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            specs[key] = TensorSpec.from_dict(value, f"{where}.{key}", key)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            spec = TensorSpec.from_dict(value, f"{where}[{i}]")
            if spec.name in specs:
                raise ConfigError(f"{where}: tensor {spec.name!r} is listed twice")
            specs[spec.name] = spec
    else:
        raise ConfigError(f"{where}: expected an object keyed by tensor name, got {type(data).__name__}")
    return specs


@dataclass
class ComponentConfig:
    """One model file (or one function of it) of the pipeline."""

    file_path: str
    inputs: Dict[str, TensorSpec] = field(default_factory=dict)
    outputs: Dict[str, TensorSpec] = field(default_factory=dict)
    states: Dict[str, TensorSpec] = field(default_factory=dict)
    functions: List[str] = field(default_factory=list)  # functions the file has
    function: Optional[str] = None  # function this component calls (None: default)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "file_path": self.file_path,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }
        if self.states:
            out["states"] = {k: v.to_dict() for k, v in self.states.items()}
        out["functions"] = list(self.functions)
        if self.function is not None:
            out["function"] = self.function
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ComponentConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
        file_path = data.get("file_path")
        if not isinstance(file_path, str) or not file_path:
            raise ConfigError(f"{where}.file_path: missing field 'file_path'")
        functions = data.get("functions", [])
        if not isinstance(functions, list) or not all(isinstance(f, str) for f in functions):
            raise ConfigError(f"{where}.functions: expected a list of function names, got {functions!r}")
        function = data.get("function")
        if function is not None and not isinstance(function, str):
            raise ConfigError(f"{where}.function: expected a function name, got {function!r}")
        return cls(
            file_path=file_path,
            inputs=_specs_from(data.get("inputs"), f"{where}.inputs"),
            outputs=_specs_from(data.get("outputs"), f"{where}.outputs"),
            states=_specs_from(data.get("states"), f"{where}.states"),
            functions=list(functions),
            function=function,
        )


@dataclass
class Shapes:
    batch_size: int
    context_length: int
    hidden_size: int
    vocab_size: int

    def to_dict(self) -> Dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "context_length": self.context_length,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Shapes":
        if not isinstance(data, Mapping):
            raise ConfigError("shapes: expected an object with batch_size, context_length, hidden_size, vocab_size")
        values = {}
        for key in ("batch_size", "context_length", "hidden_size", "vocab_size"):
            if key not in data:
                raise ConfigError(f"shapes.{key}: missing field")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"shapes.{key}: expected an integer, got {value!r}")
            values[key] = int(value)
        return cls(**values)


class ModelConfig:
    """A multi-component ANEMLL model: embeddings, FFN chunks, LM head."""

    def __init__(
        self,
        *,
        shapes: Shapes,
        embeddings: Optional[ComponentConfig],
        ffn_prefill: List[ComponentConfig],
        ffn_infer: List[ComponentConfig],
        lm_head: Optional[ComponentConfig],
        model_info: Optional[Dict[str, Any]] = None,
        ffn_execution: Optional[str] = None,
        model_dir: Optional[Union[str, Path]] = None,
        extra: Optional[Dict[str, Any]] = None,
        ffn_infer_rotate: Optional[List[ComponentConfig]] = None,
        ffn_prefill_rotate: Optional[List[ComponentConfig]] = None,
        context_functions: Optional[Dict[int, Dict[str, List[ComponentConfig]]]] = None,
    ) -> None:
        self.model_info: Dict[str, Any] = dict(model_info or {})
        self.shapes = shapes
        self.embeddings = embeddings
        self.ffn_prefill = list(ffn_prefill)
        self.ffn_infer = list(ffn_infer)
        self.ffn_infer_rotate = list(ffn_infer_rotate or [])
        self.ffn_prefill_rotate = list(ffn_prefill_rotate or [])
        # Context switching (ANEMLL's infer_ctx{N}/prefill_ctx{N}): the FFN functions of each context size
        # smaller than shapes.context_length, by role; the ffn_* lists above serve the full context.
        self.context_functions: Dict[int, Dict[str, List[ComponentConfig]]] = {
            int(n): {role: list(chunks) for role, chunks in roles.items()}
            for n, roles in sorted((context_functions or {}).items())}
        self.lm_head = lm_head
        self.model_dir: Optional[Path] = Path(model_dir) if model_dir is not None else None
        # Unknown top-level keys (e.g. candle-coreml's `naming`) survive a round trip.
        self.extra: Dict[str, Any] = dict(extra or {})
        detected = self._detect_ffn_execution()
        if ffn_execution is None:
            ffn_execution = detected
        elif ffn_execution not in FFN_EXECUTIONS:
            raise ConfigError(
                f"ffn_execution: expected one of {FFN_EXECUTIONS}, got {ffn_execution!r}"
            )
        elif detected is not None and ffn_execution != detected:
            raise ConfigError(
                f"ffn_execution: declared {ffn_execution!r} but the FFN file paths say {detected!r} "
                "(unified means prefill and infer share each file)"
            )
        self.ffn_execution: Optional[str] = ffn_execution

    # ----------------------------------------------------------------- derived
    def _detect_ffn_execution(self) -> Optional[str]:
        if not self.ffn_prefill or len(self.ffn_prefill) != len(self.ffn_infer):
            return None  # validate() names what is missing
        pf = [c.file_path for c in self.ffn_prefill]
        inf = [c.file_path for c in self.ffn_infer]
        return "unified" if pf == inf else "split"

    @property
    def num_chunks(self) -> int:
        return max(len(self.ffn_infer), len(self.ffn_prefill))

    @property
    def prefill_mode(self) -> str:
        """'sequential' when prefill takes one token at a time, else 'batch'."""
        if not self.ffn_prefill:
            return "sequential"
        hidden = self.ffn_prefill[0].inputs.get("hidden_states")
        if hidden is not None and len(hidden.shape) >= 2 and hidden.shape[-2] == 1:
            return "sequential"
        return "batch"

    @property
    def monolithic(self) -> bool:
        """One file holding embeddings, layers and head (ANEMLL 0.3.5 `model_type: monolithic`)."""
        return (self.embeddings is None and self.lm_head is None and bool(self.ffn_infer)
                and "input_ids" in self.ffn_infer[0].inputs)

    @property
    def head(self) -> Optional[ComponentConfig]:
        """The component whose outputs are the logits parts or argmax: the LM head, or a monolithic infer."""
        if self.lm_head is not None:
            return self.lm_head
        return self.ffn_infer[-1] if self.monolithic else None

    @property
    def sliding_window(self) -> Optional[int]:
        """Positions a sliding-window layer sees (Gemma 3), when shorter than the context; else None."""
        value = self.model_info.get("sliding_window")
        if value is None or isinstance(value, bool):
            return None
        try:
            window = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"model_info.sliding_window: expected a positive integer, got {value!r}") from None
        if window <= 0:
            raise ConfigError(f"model_info.sliding_window: expected a positive integer, got {value!r}")
        return window if window < self.shapes.context_length else None

    @property
    def logits_outputs(self) -> List[str]:
        """Names of the head's logits outputs in vocabulary order."""
        head = self.head
        if head is None:
            return []
        numbered = []
        for name in head.outputs:
            m = _LOGITS_RE.match(name)
            if m:
                numbered.append((int(m.group(1)), name))
        if numbered:
            return [name for _, name in sorted(numbered)]
        return ["logits"] if "logits" in head.outputs else []

    @property
    def argmax_in_model(self) -> bool:
        return self.head is not None and "argmax_idx" in self.head.outputs

    @property
    def logits_parts(self) -> int:
        """How many parts the vocabulary is split into by the head."""
        if self.argmax_in_model:
            spec = self.head.outputs["argmax_idx"]  # type: ignore[union-attr]
            return int(np.prod(spec.shape))
        return len(self.logits_outputs)

    @property
    def lm_head_chunk_sizes(self) -> List[int]:
        """Vocabulary entries per logits part (last dim of each logits output)."""
        head = self.head
        if head is None or self.argmax_in_model:
            sizes = self.model_info.get("lm_head_chunk_sizes")
            return [int(s) for s in sizes] if sizes else []
        return [head.outputs[n].shape[-1] for n in self.logits_outputs]

    @property
    def state_length(self) -> Optional[int]:
        """The longest KV-cache state's length (a sliding-window model's local cache is shorter)."""
        lengths = [spec.shape[-2] for comp in self.ffn_infer + self.ffn_prefill for spec in comp.states.values()
                   if len(spec.shape) >= 3]
        return max(lengths) if lengths else None

    def states(self) -> Dict[str, Tuple[TensorSpec, List[str]]]:
        """Every state by name: its spec and the components declaring it (checked by validate_wiring)."""
        out: Dict[str, Tuple[TensorSpec, List[str]]] = {}
        for label, comp in self.components():
            for name, spec in comp.states.items():
                out.setdefault(name, (spec, []))[1].append(label)
        return out

    @property
    def has_update_mask(self) -> bool:
        return any("update_mask" in c.inputs for c in self.ffn_prefill + self.ffn_infer)

    def components(self) -> Iterator[Tuple[str, ComponentConfig]]:
        """(label, component) for every component, chunks labelled by index."""
        if self.embeddings is not None:
            yield "embeddings", self.embeddings
        for role in FFN_ROLES + ROTATE_ROLES:
            chunks = getattr(self, role)
            for i, comp in enumerate(chunks):
                yield (role if len(chunks) == 1 else f"{role}[{i}]"), comp
        if self.lm_head is not None:
            yield "lm_head", self.lm_head

    def path_of(self, component: ComponentConfig) -> Path:
        path = Path(component.file_path)
        if path.is_absolute() or self.model_dir is None:
            return path
        return self.model_dir / path

    # ------------------------------------------------------------- validation
    def validate(self, check_files: bool = True) -> "ModelConfig":
        """Raise ConfigError naming the component, tensor and field at fault."""
        if not self.monolithic:
            for role in ("embeddings", "lm_head"):
                if getattr(self, role) is None:
                    raise ConfigError(f"components.{role}: missing component")
        for role in FFN_ROLES:
            if not getattr(self, role) and not (role == "ffn_prefill" and self.monolithic):
                raise ConfigError(f"components.{role}: missing component")
        for role in ("ffn_prefill",) + ROTATE_ROLES:
            chunks = getattr(self, role)
            if chunks and len(chunks) != len(self.ffn_infer):
                raise ConfigError(
                    f"components.{role} has {len(chunks)} chunks but components.ffn_infer has {len(self.ffn_infer)}"
                )
        if self.monolithic and len(self.ffn_infer) != 1:
            raise ConfigError(f"components.ffn_infer: a monolithic model is one file, got {len(self.ffn_infer)}")
        for size, roles in self.context_functions.items():
            where = f"context_switching.{size}"
            if not 0 < size < self.shapes.context_length:
                raise ConfigError(f"{where}: context sizes must lie below shapes.context_length "
                                  f"({self.shapes.context_length})")
            for role, chunks in roles.items():
                if role not in FFN_ROLES + ("ffn_infer_rotate",):
                    raise ConfigError(f"{where}.{role}: unknown role (known: ffn_infer, ffn_prefill, ffn_infer_rotate)")
                if len(chunks) != len(getattr(self, role)):
                    raise ConfigError(f"{where}.{role} has {len(chunks)} chunks but components.{role} has "
                                      f"{len(getattr(self, role))}")
                for i, comp in enumerate(chunks):
                    self._validate_component(f"{where}.{role}[{i}]", comp)
        window = self.sliding_window
        if window is not None and not self.ffn_infer_rotate:
            raise ConfigError(
                f"components.ffn_infer_rotate: missing: the sliding window ({window}) is shorter than the context "
                f"({self.shapes.context_length}), so positions >= {window} need function 'infer_rotate' of "
                f"{self.ffn_infer[0].file_path}"
            )
        for key, value in self.shapes.to_dict().items():
            if value <= 0:
                raise ConfigError(f"shapes.{key}: must be positive, got {value}")
        # Every path is checked for escaping the directory before any for existence.
        for label, comp in self.components():
            self._validate_component(label, comp)
        if check_files and self.model_dir is not None:
            for label, comp in self.components():
                full = self.path_of(comp)
                if not full.exists():
                    raise ConfigError(f"components.{label}.file_path: file {str(full)!r} does not exist")
        return self

    def _validate_component(self, label: str, comp: ComponentConfig) -> None:
        where = f"components.{label}"
        for kind in ("inputs", "outputs", "states"):
            for name, spec in getattr(comp, kind).items():
                for shape in spec.all_shapes:
                    if any(d <= 0 for d in shape):
                        raise ConfigError(
                            f"{where}.{kind}.{name}.shape: dimensions must be positive, got {list(shape)}"
                        )
                if spec.data_type not in DTYPES:
                    raise ConfigError(f"{where}.{kind}.{name}.data_type: unknown data type {spec.data_type!r}")
        if comp.function is not None and comp.functions and comp.function not in comp.functions:
            raise ConfigError(
                f"{where}.function: {comp.function!r} is not one of the file's functions {comp.functions}"
            )
        self._validate_path(where, comp.file_path)

    def _validate_path(self, where: str, file_path: str) -> None:
        path = Path(file_path)
        if self.model_dir is None:
            if path.is_absolute() or ".." in path.parts:
                raise ConfigError(
                    f"{where}.file_path: {file_path!r} must be relative to the model directory"
                )
            return
        root = os.path.realpath(self.model_dir)
        full = os.path.realpath(self.model_dir / path)
        if os.path.commonpath([root, full]) != root:
            raise ConfigError(
                f"{where}.file_path: {file_path!r} escapes the model directory {str(self.model_dir)!r}"
            )

    def validate_wiring(self) -> "ModelConfig":
        """Check that adjacent components agree on what they pass each other."""
        self.validate(check_files=False)
        if self.monolithic:
            self._check_states()
            return self
        emb_out = _single_output(self.embeddings, "embeddings", "hidden_states")  # type: ignore[arg-type]
        for role in FFN_ROLES:
            chunks: List[ComponentConfig] = getattr(self, role)
            prev_label, prev = "embeddings", emb_out
            for i, comp in enumerate(chunks):
                label = role if len(chunks) == 1 else f"{role}[{i}]"
                hidden_in = comp.inputs.get("hidden_states")
                if hidden_in is None:
                    raise ConfigError(f"components.{label}.inputs.hidden_states: missing input")
                # Between chunks the whole shape must match; the embeddings output is
                # flexible in sequence length, so only its enumerated shapes are checked.
                _check_link(prev_label, prev, label, hidden_in, whole=(i > 0))
                prev_label, prev = label, _single_output(comp, label, "output_hidden_states")
            if role == "ffn_infer":
                head_in = self.lm_head.inputs.get("hidden_states")  # type: ignore[union-attr]
                if head_in is None:
                    raise ConfigError("components.lm_head.inputs.hidden_states: missing input")
                _check_link(prev_label, prev, "lm_head", head_in, whole=True)
        self._check_states()
        return self

    def _check_states(self) -> None:
        """States are shared by name: one spec wherever a name is declared, and parts sharing a state declare
        the same set (a backend state, like Core ML's MLState, holds every state of the model it comes from)."""
        seen: Dict[str, Tuple[str, TensorSpec]] = {}
        sets: List[Tuple[str, frozenset]] = []
        for label, comp in self.components():
            for name, spec in comp.states.items():
                if name in seen:
                    ref_label, ref = seen[name]
                    for field_name, mine, theirs in (("shape", list(spec.shape), list(ref.shape)),
                                                     ("data_type", spec.data_type, ref.data_type)):
                        if mine != theirs:
                            raise ConfigError(
                                f"components.{label}.states.{name}.{field_name}: {mine} ({comp.file_path}"
                                f"{', function ' + comp.function if comp.function else ''}) differs from "
                                f"{theirs} in components.{ref_label}"
                            )
                else:
                    seen[name] = (label, spec)
            names = frozenset(comp.states)
            if not names:
                continue
            for other_label, other in sets:
                if other != names and other & names:
                    raise ConfigError(
                        f"components.{label}.states: names {sorted(names)} differ from "
                        f"components.{other_label}.states {sorted(other)} although they share "
                        f"{sorted(other & names)}"
                    )
            sets.append((label, names))

    # -------------------------------------------------------------- JSON I/O
    def to_dict(self) -> Dict[str, Any]:
        components: Dict[str, Any] = {}
        if self.embeddings is not None:
            components["embeddings"] = self.embeddings.to_dict()
        for role in FFN_ROLES + ROTATE_ROLES:
            chunks = getattr(self, role)
            if len(chunks) == 1:
                components[role] = chunks[0].to_dict()
            elif chunks:
                components[role] = [c.to_dict() for c in chunks]
        if self.lm_head is not None:
            components["lm_head"] = self.lm_head.to_dict()
        out: Dict[str, Any] = {
            "model_info": dict(self.model_info),
            "shapes": self.shapes.to_dict(),
            "components": components,
        }
        if self.ffn_execution is not None:
            out["ffn_execution"] = self.ffn_execution
        if self.context_functions:
            out["context_switching"] = {
                str(n): {role: [c.to_dict() for c in chunks] for role, chunks in roles.items()}
                for n, roles in self.context_functions.items()}
        out.update(self.extra)
        return out

    def to_json(self, path: Optional[Union[str, Path]] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        # Shapes read better on one line: [1, 64, 1024].
        text = _INT_LIST_RE.sub(lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Any, model_dir: Optional[Union[str, Path]] = None) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config: expected a JSON object, got {type(data).__name__}")
        if "shapes" not in data:
            raise ConfigError("shapes: missing section")
        if "components" not in data:
            raise ConfigError("components: missing section")
        components = data["components"]
        if not isinstance(components, Mapping):
            raise ConfigError("components: expected an object keyed by component role")
        unknown = set(components) - set(COMPONENT_ROLES)
        if unknown:
            raise ConfigError(
                f"components: unknown component(s) {sorted(unknown)} (known: {', '.join(COMPONENT_ROLES)})"
            )

        def one(role: str) -> Optional[ComponentConfig]:
            if role not in components:
                return None
            return ComponentConfig.from_dict(components[role], f"components.{role}")

        def chunks(role: str) -> List[ComponentConfig]:
            value = components.get(role)
            if value is None:
                return []
            if isinstance(value, list):
                return [ComponentConfig.from_dict(v, f"components.{role}[{i}]") for i, v in enumerate(value)]
            return [ComponentConfig.from_dict(value, f"components.{role}")]

        model_info = data.get("model_info", {})
        if not isinstance(model_info, Mapping):
            raise ConfigError("model_info: expected an object")
        known = {"model_info", "shapes", "components", "ffn_execution", "context_switching"}
        switching = data.get("context_switching") or {}
        if not isinstance(switching, Mapping):
            raise ConfigError("context_switching: expected an object keyed by context size")
        context_functions: Dict[int, Dict[str, List[ComponentConfig]]] = {}
        for size, roles in switching.items():
            try:
                n = int(size)
            except (TypeError, ValueError):
                raise ConfigError(f"context_switching: key {size!r} is not a context size") from None
            if not isinstance(roles, Mapping):
                raise ConfigError(f"context_switching.{size}: expected an object keyed by role")
            context_functions[n] = {
                role: [ComponentConfig.from_dict(c, f"context_switching.{size}.{role}[{i}]")
                       for i, c in enumerate(chunks if isinstance(chunks, list) else [chunks])]
                for role, chunks in roles.items()}
        return cls(
            model_info=dict(model_info),
            shapes=Shapes.from_dict(data["shapes"]),
            embeddings=one("embeddings"),
            ffn_prefill=chunks("ffn_prefill"),
            ffn_infer=chunks("ffn_infer"),
            ffn_infer_rotate=chunks("ffn_infer_rotate"),
            ffn_prefill_rotate=chunks("ffn_prefill_rotate"),
            lm_head=one("lm_head"),
            ffn_execution=data.get("ffn_execution"),
            model_dir=model_dir,
            extra={k: v for k, v in data.items() if k not in known},
            context_functions=context_functions,
        )

    @classmethod
    def from_json(
        cls, source: Union[str, Path], model_dir: Optional[Union[str, Path]] = None
    ) -> "ModelConfig":
        """Read a config from a JSON file path or a JSON string.

        A file's model directory defaults to `model_info.path` when present,
        else the directory holding the JSON file.
        """
        text: str
        json_path: Optional[Path] = None
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            json_path = Path(source)
            if not json_path.is_file():
                raise ConfigError(f"model config file {str(json_path)!r} does not exist")
            from anemll_fast.text_files import read_utf8

            text = read_utf8(json_path, ConfigError)
        else:
            text = source
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            where = str(json_path) if json_path else "model config"
            raise ConfigError(f"{where}: invalid JSON ({exc})") from None
        if model_dir is None and isinstance(data, Mapping):
            info_path = (data.get("model_info") or {}).get("path") if isinstance(data.get("model_info"), Mapping) else None
            if isinstance(info_path, str) and info_path:
                model_dir = info_path
            elif json_path is not None:
                model_dir = json_path.parent
        return cls.from_dict(data, model_dir=model_dir)

    @classmethod
    def from_anemll_dir(cls, path: Union[str, Path]) -> "ModelConfig":
        """Build the config of an ANEMLL model directory (meta.yaml + model files)."""
        from anemll_fast.anemll_dir import config_from_anemll_dir

        return config_from_anemll_dir(path)

    def __repr__(self) -> str:
        return (
            f"ModelConfig(model_dir={str(self.model_dir)!r}, chunks={self.num_chunks}, "
            f"ffn_execution={self.ffn_execution!r}, prefill_mode={self.prefill_mode!r}, "
            f"logits_parts={self.logits_parts}, shapes={self.shapes.to_dict()})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def _single_output(comp: ComponentConfig, label: str, preferred: str) -> TensorSpec:
    if preferred in comp.outputs:
        return comp.outputs[preferred]
    if len(comp.outputs) == 1:
        return next(iter(comp.outputs.values()))
    raise ConfigError(
        f"components.{label}.outputs.{preferred}: missing output (has {sorted(comp.outputs)})"
    )


def _check_link(
    src_label: str, src: TensorSpec, dst_label: str, dst: TensorSpec, whole: bool
) -> None:
    where = f"components.{dst_label}.inputs.{dst.name}"
    if src.data_type != dst.data_type:
        raise ConfigError(
            f"{where}.data_type: {dst.data_type} does not match {src.data_type} of "
            f"components.{src_label}.outputs.{src.name}"
        )
    if src.shape[-1] != dst.shape[-1]:
        raise ConfigError(
            f"{where}.shape: hidden size {dst.shape[-1]} does not match {src.shape[-1]} of "
            f"components.{src_label}.outputs.{src.name}"
        )
    if whole and tuple(src.shape) != tuple(dst.shape):
        raise ConfigError(
            f"{where}.shape: {list(dst.shape)} does not match {list(src.shape)} of "
            f"components.{src_label}.outputs.{src.name}"
        )
    if not whole and src.enumerated_shapes and tuple(dst.shape) not in src.all_shapes:
        raise ConfigError(
            f"{where}.shape: {list(dst.shape)} is not among the shapes "
            f"{[list(s) for s in src.all_shapes]} that components.{src_label}.outputs.{src.name} takes"
        )
