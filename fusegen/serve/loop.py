"""One thread drives the engine; HTTP handlers talk to it through queues and never touch the
engine themselves.

    handler ──submit(prompt, ...)──▶ commands ──▶ ┌ engine thread ─────────────────────┐
    handler ──abort(id)────────────▶ commands ──▶ │ drain commands (add / abort)       │
                                                  │ engine.step()  (host one step ahead)│
    handler ◀── asyncio.Queue ◀── call_soon_threadsafe ◀── events, failures           │
                                                  └────────────────────────────────────┘

Because only this thread calls the engine, a step never waits on an HTTP handler and a
handler never blocks the event loop on the engine's lock. One callback per step carries
all of that step's events to the event loop.

With tensor parallelism the engine is rank 0's: while it has nothing to step the thread calls
its runner's ``idle`` (the followers' keep-alive), and a ``TensorParallelError`` (a rank is
gone) is fatal: every request fails with it, the thread ends (``/health`` answers 503) and
``on_fatal`` is called, which stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from fusegen.distributed import TensorParallelError
from fusegen.runtime.engine import Engine
from fusegen.runtime.scheduler import TokenEvent

log = logging.getLogger("fusegen.serve")


class Overloaded(Exception):
    """More requests are waiting than the server queues."""


@dataclass
class Subscription:
    """One request's events (``TokenEvent``s, then possibly an exception) on the event loop."""
    request_id: int
    events: asyncio.Queue


@dataclass
class Spec:
    """One request to add: its prompt, budget, ``SamplingParams`` fields and log-probs."""
    prompt: list[int]
    max_new_tokens: int
    sampling: dict
    logprobs: int = 0


@dataclass
class _Add:
    specs: list[Spec]
    sinks: list[asyncio.Queue]
    future: Future          # resolves to the request ids, or the first spec's error


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int = 1024, on_fatal=None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_fatal = on_fatal    # called (on the engine thread) with the error that ended the loop
        self.fatal: TensorParallelError | None = None
        self._idle = getattr(engine.runner, "idle", None)   # a LeadRunner's keep-alive
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_adds = 0
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._sinks: dict[int, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- event-loop side ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fusegen-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """The engine thread is running (``/health``)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet running (a racy read: for metrics and admission)."""
        return len(self.engine.scheduler.waiting) + self._pending_adds

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    async def submit(self, specs: list[Spec]) -> list[Subscription]:
        """Queue requests together, all or none (they enter the same step); raises
        ``Overloaded``, or the engine's ``ValueError`` for the first bad one. A caller
        cancelled while waiting leaves nothing behind: its requests are aborted once added."""
        if self.fatal is not None:
            raise self.fatal
        waiting = self.num_waiting
        if waiting + len(specs) > self.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting and this one adds {len(specs)} "
                             f"(the limit is {self.max_waiting})")
        sinks = [asyncio.Queue() for _ in specs]
        future: Future = Future()
        with self._count_lock:
            self._pending_adds += len(specs)
        self._commands.put(_Add(specs, sinks, future))
        self._wake.set()
        if self.fatal is not None:   # the loop ended after the check above: nobody drains the queue
            self._refuse_queued(self.fatal)
        try:
            ids = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(self._abort_added)
            raise
        return [Subscription(rid, sink) for rid, sink in zip(ids, sinks)]

    def _abort_added(self, future: Future) -> None:
        if future.exception() is None:
            for rid in future.result():
                self.abort(rid)

    def abort(self, request_id: int) -> None:
        """Drop a request (a client went away, or a stop string ended it)."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    # --- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    if self._idle is not None:
                        self._idle()
                    continue
                self._publish(self.engine.step())
            except TensorParallelError as exc:
                log.error("%s", exc)
                self.fatal = exc
                self._fail_all(exc)
                self._refuse_queued(exc)
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                return
            except Exception as exc:  # noqa: BLE001 - the engine stays consistent; tell everyone
                log.exception("engine step failed")
                self._fail_all(exc)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._add(command)
            else:
                _, request_id = command
                self._sinks.pop(request_id, None)
                if request_id in self.engine.scheduler.requests:
                    self.engine.abort(request_id)

    def _add(self, command: _Add) -> None:
        ids: list[int] = []
        try:
            for spec in command.specs:
                ids.append(self.engine.add_request(spec.prompt, spec.max_new_tokens, logprobs=spec.logprobs,
                                                   **spec.sampling))
        except Exception as exc:  # noqa: BLE001 - the handler answers it
            for rid in ids:
                self.engine.abort(rid)
            command.future.set_exception(exc)
        else:
            self._sinks.update(zip(ids, command.sinks))
            command.future.set_result(ids)
        finally:
            with self._count_lock:
                self._pending_adds -= len(command.specs)

    def _publish(self, events: list[TokenEvent]) -> None:
        deliveries = []
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is not None:
                deliveries.append((sink, event))
                if event.finished:
                    del self._sinks[event.request_id]
        while self.engine.failures:
            rid, error = self.engine.failures.popleft()
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                deliveries.append((sink, error))
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, exc: Exception) -> None:
        deliveries = [(sink, exc) for sink in self._sinks.values()]
        for rid in list(self._sinks):
            if rid in self.engine.scheduler.requests:
                self.engine.abort(rid)
        self._sinks.clear()
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)


    def _refuse_queued(self, exc: Exception) -> None:
        """Fail the adds still queued (the loop has ended)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add) and not command.future.done():
                with self._count_lock:
                    self._pending_adds -= len(command.specs)
                command.future.set_exception(exc)


def _deliver(deliveries: list) -> None:
    for sink, item in deliveries:
        sink.put_nowait(item)
