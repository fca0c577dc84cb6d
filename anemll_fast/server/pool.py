"""The server's models and the one worker thread that runs every generation.

One engine runs one generation at a time, so generations are serialised on a
single thread; requests wait in a bounded queue (the caller answers 429 when it
is full). Models are loaded on that same thread when a request names one that
is not resident, evicting the least recently used beyond `max_models`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("anemll_fast.server")

DEFAULT_ID = "default"


@dataclass(frozen=True)
class ModelSpec:
    id: str  # what requests name
    source: Optional[str]  # a directory or repo id; None: the embedded default


def parse_model_args(values: Sequence[str]) -> List[ModelSpec]:
    """`--model` values: `PATH_OR_REPO` (named by itself) or `ALIAS=PATH_OR_REPO`."""
    specs: List[ModelSpec] = []
    for value in values or ():
        alias, sep, source = value.partition("=")
        if not sep:
            alias, source = value.rstrip("/"), value
        if not alias or not source:
            raise ValueError(f"--model: expected PATH, REPO_ID or ALIAS=PATH, got {value!r}")
        if any(s.id == alias for s in specs):
            raise ValueError(f"--model: the name {alias!r} is given twice")
        specs.append(ModelSpec(alias, source))
    return specs or [ModelSpec(DEFAULT_ID, None)]


class UnknownModel(LookupError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"model {name!r} does not exist; known models: {', '.join(known)}")
        self.name = name


class ModelPool:
    """Known models by name; at most `max_models` resident. Used from the worker thread only."""

    def __init__(self, specs: Sequence[ModelSpec], *, max_models: int = 1,
                 loader: Optional[Callable[[Optional[str]], Any]] = None) -> None:
        if max_models < 1:
            raise ValueError(f"--max-models: must be >= 1, got {max_models}")
        self.specs = list(specs)
        self.max_models = max_models
        self._loader = loader
        self._resident: "OrderedDict[str, Any]" = OrderedDict()
        self.loads = 0  # how many times a model was loaded (swaps show here)

    @property
    def ids(self) -> List[str]:
        return [s.id for s in self.specs]

    def resolve(self, name: Optional[str]) -> ModelSpec:
        """The spec a request's `model` names (none: the first); by name, or by its source."""
        if name is None or name == "":
            return self.specs[0]
        for spec in self.specs:
            if name == spec.id or (spec.source is not None and name == spec.source):
                return spec
        raise UnknownModel(name, self.ids)

    def resident(self) -> List[str]:
        return list(self._resident)

    def get(self, spec: ModelSpec) -> Any:
        model = self._resident.get(spec.id)
        if model is not None:
            self._resident.move_to_end(spec.id)
            return model
        while len(self._resident) >= self.max_models:
            old_id, old = self._resident.popitem(last=False)
            log.info("unloading model %s", old_id)
            old.close()
        started = time.perf_counter()
        model = self._load(spec.source)
        self.loads += 1
        log.info("loaded model %s in %.1f s", spec.id, time.perf_counter() - started)
        self._resident[spec.id] = model
        return model

    def _load(self, source: Optional[str]) -> Any:
        if self._loader is not None:
            return self._loader(source)
        import anemll_fast

        return anemll_fast.load(source)

    def close(self) -> None:
        while self._resident:
            self._resident.popitem()[1].close()


class Job:
    """One request's generation: the worker runs `work(job)`, which emits events that the
    request's coroutine reads; `cancel()` (a client gone, a timeout) stops it within a token."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spec: ModelSpec, work: Callable[["Job", Any], None],
                 deadline: float, request_id: str = "") -> None:
        self.id = request_id
        self.spec = spec
        self.work = work
        self.deadline = deadline  # time.monotonic() after which the request gives up
        self.cancelled = threading.Event()
        self._loop = loop
        # A deque and an Event rather than asyncio.Queue: wait_for(queue.get()) can drop an
        # item when the timeout races the get (Python < 3.12); a missed Event wake-up loses nothing.
        self._events: "deque[Tuple[str, Any]]" = deque()
        self._ready = asyncio.Event()

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._push, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            self.cancelled.set()

    def _push(self, event: Tuple[str, Any]) -> None:
        self._events.append(event)
        self._ready.set()

    async def next_event(self, timeout: Optional[float] = None) -> Tuple[str, Any]:
        """The next event; asyncio.TimeoutError when none comes within `timeout` seconds."""
        if not self._events:
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._events.popleft()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class QueueFull(Exception):
    pass


class Worker:
    """The generation thread and its bounded queue (`max_queue` waiting besides the running one)."""

    def __init__(self, pool: ModelPool, *, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError(f"--max-queue: must be >= 0, got {max_queue}")
        self.pool = pool
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anemll-fast-gen")
        self._lock = threading.Lock()
        self.pending = 0  # queued + running
        self.running: Optional[Job] = None

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending >= self.max_queue + 1:
                raise QueueFull()
            self.pending += 1
        self._executor.submit(self._run, job)

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                job.emit("cancelled")
                return
            if job.expired:
                job.emit("timeout")
                return
            self.running = job
            try:
                model = self.pool.get(job.spec)
            except Exception as exc:  # a model that cannot load is the server's problem, told plainly
                log.exception("loading model %s failed", job.spec.id)
                job.emit("error", exc)
                return
            job.work(job, model)
        except BaseException as exc:  # never lose the worker thread
            log.exception("generation failed")
            job.emit("error", exc)
        finally:
            self.running = None
            with self._lock:
                self.pending -= 1

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread and wait (start-up model loading)."""
        return self._executor.submit(fn).result()

    def shutdown(self) -> None:
        if self.running is not None:
            self.running.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.pool.close()


@dataclass
class Prepared:
    """A request turned into what the engine runs."""

    ids: List[int]
    settings: Any
    constraint: Any = None
    cache_prompt: bool = True
    tool_format: Optional[str] = None
    tool_names: List[str] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
