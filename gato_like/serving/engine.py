"""The serving engine: sessions, and a batcher that runs every pending step in one forward pass.

::

    event loop (asyncio)                          worker thread (the only one touching the model)
    ───────────────────                          ───────────────────────────────────────────────
    Engine.step(session, i, obs)
      step index checks, spec validation
      bounded queue (OVERLOADED) ──► ops ──►  take all closes/resets + up to max_batch steps
      await the op's future                   drop steps past their deadline (DEADLINE_EXCEEDED)
                                              ActingCore.act: tokenize, roll full windows, one
                                              model.step for all new tokens, one per action token
      ◄── loop.call_soon_threadsafe(result) ◄─┘

The engine hands out rows and tracks sessions; acting is :class:`gato_like.acting.ActingCore`'s,
the same core :class:`gato_like.policy.Policy` acts through. Each session owns one row of the
core's KV cache; sessions of different embodiments share a forward pass; only sessions that act
with another head (goal-conditioned) take a separate pass in the same tick.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gato_like.acting import ActingCore, Row, episode_seed
from gato_like.checkpoint import Checkpoint
from gato_like.serving import protocol as p
from gato_like.serving.config import EngineConfig
from gato_like.serving.protocol import ProtocolError
from gato_like.tokenizers import EmbodimentSpec, SpecMismatchError

log = logging.getLogger("gato_like.serving")

MAX_TEMPERATURE = 100.0
"""Highest sampling temperature a reset may ask for."""

DEADLINE_MS_RANGE = (1.0, 60_000.0)
"""The ``deadline_ms`` a step may ask for, inclusive; outside it the step is refused (BAD_MESSAGE)."""
MIN_RETRY_AFTER_MS = 10
"""The shortest OVERLOADED ``retry_after_ms``: sooner, a retry would only meet the same full queue."""


def worker_threads(cores: int | None = None) -> int:
    """Intra-op threads for the model's worker on a machine with ``cores`` usable cores (default:
    this process's): 1 up to 4 cores, else half of them, at most 8.

    A server shares its machine with its own event loop (decoding, validation, sockets), its
    clients and often a simulator. On a few cores an OpenMP region over a robot-sized tensor
    waits for threads the scheduler has given to those, which costs more than the second core
    gains (docs/serving.md measures it); on many cores the event loop keeps cores of its own.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 4 else min(cores // 2, 8)


# -- loop side: sessions and the batcher ----------------------------------------------------------


@dataclass
class Session:
    """A client's episode state as the event loop sees it; ``slot`` belongs to the worker thread."""

    id: str
    slot: Row
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    owner: object | None = None  # the connection it is attached to, None while detached
    detached_at: float | None = None  # when it lost its connection (monotonic), None while attached
    spec: EmbodimentSpec | None = None
    task: str | None = None
    next_step: int = 0
    last_reply: dict[str, Any] | None = None  # the action reply of step next_step - 1
    inflight: tuple[str, int, asyncio.Future[Any]] | None = None  # ("step"|"reset", index, future)
    closed: bool = False
    episodes: int = 0
    """Episodes reset so far; the ``e``-th samples with ``episode_seed(0, e)``, as the ``e``-th
    episode of a new local ``Policy`` does."""

    def touch(self) -> None:
        self.last_active = time.monotonic()


@dataclass
class _Op:
    kind: str  # "step", "reset", "close", "call"
    session: Session | None
    payload: Any
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float = math.inf


@dataclass
class StepResult:
    """What the worker returns for one step: the action and where the time went."""

    action: np.ndarray
    queue_ms: float
    compute_ms: float
    batch_size: int


StatsHook = Callable[[str, float], None]


class Engine:
    """Sessions over one model, with a batching worker thread.

    Call :meth:`start` from the event loop that will use the engine; every other public method is
    called on that loop. The model runs only on the engine's worker thread.

    Args:
        checkpoint: the loaded checkpoint.
        config: limits.
        observe: called on the worker thread as ``observe(name, value)`` with ``batch_size``,
            ``compute_seconds`` and ``queue_seconds`` samples (the server feeds Prometheus with it).
    """

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, observe: StatsHook | None = None) -> None:  # fmt: skip
        self.checkpoint = checkpoint
        self.config = config or EngineConfig()
        self.threads = self.config.threads or worker_threads()
        """Intra-op threads the worker runs the model with."""
        self.pool = ActingCore(
            checkpoint.model, checkpoint.text, self.config.device, rows=min(self.config.max_sessions, 8)
        )
        self.sessions: dict[str, Session] = {}
        self.observe = observe or (lambda name, value: None)
        self.ready = False
        self._ops: collections.deque[_Op] = collections.deque()
        self._pending_steps = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.0  # moving average of a forward pass, for retry_after_ms
        self.loop: asyncio.AbstractEventLoop | None = None

    # lifecycle

    async def start(self, warmup: bool = True) -> None:
        """Start the worker thread and (``warmup``) act a few steps for every embodiment; then ``ready``."""
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="gato-like-batcher", daemon=True)
        self._thread.start()
        if warmup:
            await self._call(self._warmup)
        self.ready = True

    async def stop(self) -> None:
        """Stop the worker thread (pending operations fail)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self.ready = False

    def _warmup(self) -> None:
        rng = np.random.default_rng(0)
        for spec in self.checkpoint.specs.values():
            slot = self.pool.allocate()
            try:
                self.pool.reset([(slot, spec, None, None)])
                for _ in range(2):
                    (result,) = self.pool.act([(slot, p.example_observation(spec.to_dict(), rng))])
                    if isinstance(result, Exception):
                        raise result
            finally:
                self.pool.release(slot)

    # sessions

    def open_session(self, owner: object) -> Session:
        """A new session attached to ``owner``. When ``max_sessions`` are live, the longest-detached
        session is closed to make room; with none detached, ProtocolError SESSION_LIMIT."""
        if len(self.sessions) >= self.config.max_sessions:  # the longest-detached session makes room
            detached = [s for s in self.sessions.values() if s.detached_at is not None and s.inflight is None]
            if detached:
                self.close_session(min(detached, key=lambda s: s.detached_at or 0.0), "evicted")
        if len(self.sessions) >= self.config.max_sessions:
            raise ProtocolError(
                p.SESSION_LIMIT,
                f"the server holds its maximum of {self.config.max_sessions} sessions",
                expected=f"at most {self.config.max_sessions} sessions",
                got=str(len(self.sessions)),
                fatal=True,
                retry_after_ms=self._next_expiry_ms(),
            )
        session = Session(secrets.token_hex(16), Row(), owner=owner)
        self.sessions[session.id] = session
        log.info("session_open", extra={"fields": {"session": session.id}})
        return session

    def resume_session(self, session_id: str, owner: object) -> Session:
        """Attach an existing session to a new connection (the previous one loses it)."""
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise ProtocolError(p.UNKNOWN_SESSION, "no live session with this id (expired or never opened)", "session", "a live session id", session_id[:64], fatal=True)  # fmt: skip
        session.owner, session.detached_at = owner, None
        session.touch()
        log.info("session_resume", extra={"fields": {"session": session.id}})
        return session

    def detach_session(self, session: Session) -> None:
        """The session's connection is gone: keep it ``detached_grace_s`` for a resume."""
        session.owner, session.detached_at = None, time.monotonic()
        log.info("session_detach", extra={"fields": {"session": session.id, "grace_s": self.config.detached_grace_s}})  # fmt: skip

    def close_session(self, session: Session, reason: str = "closed") -> None:
        """Forget a session and free its cache row."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        self._submit(_Op("close", session, None, None, None))
        log.info("session_close", extra={"fields": {"session": session.id, "reason": reason}})

    def expire_idle(self, now: float | None = None) -> list[Session]:
        """Close sessions idle longer than ``idle_timeout_s`` and sessions detached (no connection)
        longer than ``detached_grace_s``; none with a step in flight."""
        now = time.monotonic() if now is None else now
        expired: list[tuple[Session, str]] = []
        for s in self.sessions.values():
            if s.inflight is not None:
                continue
            if now - s.last_active > self.config.idle_timeout_s:
                expired.append((s, "idle"))
            elif s.detached_at is not None and now - s.detached_at > self.config.detached_grace_s:
                expired.append((s, "detached"))
        for session, reason in expired:
            self.close_session(session, reason)
        return [session for session, _ in expired]

    def _next_expiry_ms(self) -> int:
        """Milliseconds until the first session is due to expire (SESSION_LIMIT's retry hint)."""
        now, config = time.monotonic(), self.config
        due = [s.last_active + config.idle_timeout_s for s in self.sessions.values()]
        due += [s.detached_at + config.detached_grace_s for s in self.sessions.values() if s.detached_at is not None]  # fmt: skip
        return max(1, math.ceil((min(due, default=now) - now) * 1000))

    # requests

    async def reset(
        self,
        session: Session,
        task: str | None = None,
        embodiment: str | None = None,
        prompt: Mapping[str, Any] | None = None,
        goal: Mapping[str, Any] | None = None,
        temperature: float = 0.0,
    ) -> EmbodimentSpec:
        """Start a new episode of a task (or embodiment), optionally with a prompt
        ``{"obs": {key: (T, ...)}, "actions": (T, ...)}``, a goal observation and a sampling
        ``temperature`` (0: the model's own decoding, as a local ``Policy``)."""
        if session.closed:
            raise ProtocolError(p.SESSION_EXPIRED, "the session was closed", fatal=True)
        session.touch()
        if isinstance(temperature, bool) or not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ProtocolError(p.BAD_MESSAGE, "temperature out of range", "temperature", f"a number in [0, {MAX_TEMPERATURE:g}] (0: the model's own decoding)", repr(temperature))  # fmt: skip
        if session.inflight is not None:
            raise ProtocolError(p.BUSY, "a step is in flight; reset after its reply", "type", "no step in flight", f"step {session.inflight[1]} in flight")  # fmt: skip
        name = task or embodiment
        if name is None:
            if len(self.checkpoint.specs) != 1:
                raise ProtocolError(p.UNKNOWN_TASK, "name a task or an embodiment", "task", f"one of {sorted(set(self.checkpoint.specs) | set(self.checkpoint.tasks))}", "nothing")  # fmt: skip
            name = next(iter(self.checkpoint.specs))
        try:
            spec = self.checkpoint.spec_for(name)
        except KeyError:
            field_name = "task" if task else "embodiment"
            raise ProtocolError(p.UNKNOWN_TASK, f"the model knows no task or embodiment {name!r}", field_name, f"one of {sorted(set(self.checkpoint.specs) | set(self.checkpoint.tasks))}", name) from None  # fmt: skip
        if embodiment is not None and task is not None and spec.name != embodiment:
            raise ProtocolError(p.UNKNOWN_TASK, f"task {task!r} belongs to embodiment {spec.name!r}", "embodiment", spec.name, embodiment)  # fmt: skip
        prompt_pair = None
        try:
            if prompt is not None:
                spec.check_episode(prompt["obs"], prompt["actions"])  # keys obs.<key>, actions
                prompt_pair = (prompt["obs"], prompt["actions"])
        except SpecMismatchError as error:
            raise _violations_error(p.INVALID_PROMPT, "prompt", error, "prompt") from None
        try:
            if goal is not None:
                spec.check_step(goal)
        except SpecMismatchError as error:
            raise _violations_error(p.INVALID_PROMPT, "goal", error, "goal") from None
        future = self._future()
        session.inflight = ("reset", -1, future)

        def done(f: asyncio.Future[Any]) -> None:  # on the loop, even if the connection is gone
            session.inflight = None
            if not f.cancelled() and f.exception() is None:
                session.spec, session.task = spec, name
                session.next_step, session.last_reply = 0, None
                session.episodes += 1

        future.add_done_callback(done)
        payload = (spec, prompt_pair, goal, episode_seed(0, session.episodes), temperature)
        self._submit(_Op("reset", session, payload, future, self.loop))
        try:
            await asyncio.shield(future)
        except ValueError as error:
            if isinstance(error, ProtocolError):
                raise
            raise ProtocolError(p.INVALID_PROMPT, str(error), "prompt") from None
        return spec

    async def step(
        self, session: Session, index: int, observation: Mapping[str, Any], deadline_ms: float | None = None
    ) -> dict[str, Any]:
        """The ``action`` reply for step ``index`` (see docs/protocol.md for the index rules)."""
        received = time.monotonic()
        session.touch()
        if index < 0:
            raise ProtocolError(p.BAD_MESSAGE, f"step: {index} is negative; an episode's steps are numbered from 0", "step", "an integer >= 0", str(index))  # fmt: skip
        low, high = DEADLINE_MS_RANGE
        if deadline_ms is not None and not low <= deadline_ms <= high:
            raise ProtocolError(p.BAD_MESSAGE, f"deadline_ms: {deadline_ms} is outside {low:g} to {high:g} ms", "deadline_ms", f"a number from {low:g} to {high:g}", str(deadline_ms))  # fmt: skip
        if session.spec is None:
            raise ProtocolError(p.NOT_RESET, "send a reset before the first step", "type", "reset", "step")
        if session.inflight is not None:
            kind, at, future = session.inflight
            if kind == "step" and at == index:  # resent while in flight: the same reply
                await asyncio.shield(future)
                assert session.last_reply is not None
                return session.last_reply
            raise ProtocolError(p.BUSY, f"{kind} {at} is in flight; wait for its reply", "step", f"{at}", str(index))  # fmt: skip
        if session.last_reply is not None and index == session.next_step - 1:
            return session.last_reply
        if index < session.next_step:
            raise ProtocolError(p.STALE_STEP, f"step {index} is older than the last step answered ({session.next_step - 1})", "step", f"{session.next_step - 1} (resend) or {session.next_step} (next)", str(index))  # fmt: skip
        if index > session.next_step:
            raise ProtocolError(p.STEP_GAP, f"step {index} skips ahead; the next step is {session.next_step}", "step", str(session.next_step), str(index))  # fmt: skip
        try:
            session.spec.check_step(observation)
        except SpecMismatchError as error:
            raise _violations_error(p.INVALID_OBSERVATION, "observation", error, "obs") from None
        validated = time.monotonic()
        with self._cond:
            if self._pending_steps >= self.config.queue_size:
                raise ProtocolError(p.OVERLOADED, f"{self._pending_steps} steps are waiting for the model", None, f"at most {self.config.queue_size} waiting", str(self._pending_steps), retry_after_ms=self.retry_after_ms())  # fmt: skip
        budget = self.config.step_deadline_ms if deadline_ms is None else deadline_ms
        future = self._future()
        session.inflight = ("step", index, future)
        op = _Op("step", session, observation, future, self.loop, deadline=received + budget / 1000)
        future.add_done_callback(lambda f: self._step_done(session, index, f, received, validated))
        self._submit(op)
        await asyncio.shield(future)
        assert session.last_reply is not None
        return session.last_reply

    def _step_done(self, session: Session, index: int, future: asyncio.Future[Any], received: float, validated: float) -> None:  # fmt: skip
        """On the loop when the worker is done with a step, even if its connection is gone."""
        session.inflight = None
        if future.cancelled() or future.exception() is not None:
            error = None if future.cancelled() else future.exception()
            if isinstance(error, ProtocolError) and error.fatal:
                self.close_session(session, error.code)
            return
        result: StepResult = future.result()
        done = time.monotonic()
        session.next_step = index + 1
        session.last_reply = {
            "type": "action",
            "step": index,
            "action": p.encode_array(result.action),
            "timing": {
                "validate_ms": round((validated - received) * 1000, 3),
                "queue_ms": round(result.queue_ms, 3),
                "compute_ms": round(result.compute_ms, 3),
                "batch_size": result.batch_size,
                "total_ms": round((done - received) * 1000, 3),
            },
        }

    def retry_after_ms(self) -> int:
        """When the queue should have room: batches ahead (at least one) times the mean forward-pass
        time, and never under :data:`MIN_RETRY_AFTER_MS`."""
        batches = math.ceil(max(self._pending_steps, 1) / self.config.max_batch)
        return max(MIN_RETRY_AFTER_MS, math.ceil(batches * self._step_seconds * 1000))

    @property
    def pending_steps(self) -> int:
        return self._pending_steps

    # worker plumbing

    def _future(self) -> asyncio.Future[Any]:
        assert self.loop is not None, "Engine.start() first"
        return self.loop.create_future()

    async def _call(self, function: Callable[[], Any]) -> Any:
        future = self._future()
        self._submit(_Op("call", None, function, future, self.loop))
        return await future

    def _submit(self, op: _Op) -> None:
        with self._cond:
            self._ops.append(op)
            if op.kind == "step":
                self._pending_steps += 1
            self._cond.notify()

    def _take(self) -> list[_Op] | None:
        with self._cond:
            while not self._ops and not self._stopping:
                self._cond.wait()
            if self._stopping:
                ops, self._ops = list(self._ops), collections.deque()
                self._pending_steps = 0
                for op in ops:
                    _resolve(op, ProtocolError(p.INTERNAL, "the server is shutting down", fatal=True))
                return None
            taken: list[_Op] = []
            steps = 0
            kept: collections.deque[_Op] = collections.deque()
            while self._ops:
                op = self._ops.popleft()
                if op.kind == "step":
                    if steps >= self.config.max_batch:
                        kept.append(op)
                        continue
                    steps += 1
                    self._pending_steps -= 1
                taken.append(op)
            self._ops = kept
            return taken

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)  # OpenMP's setting is the calling thread's: this one's
        while True:
            ops = self._take()
            if ops is None:
                return
            try:
                self._tick(ops)
            except Exception as error:  # a bug: fail this tick's requests, keep serving the others
                log.exception("batch_failed")
                for op in ops:
                    if op.session is not None and op.kind in ("step", "reset"):
                        _resolve(op, ProtocolError(p.INTERNAL, f"server error: {type(error).__name__}: {error}", fatal=True))  # fmt: skip
                        self.pool.release(op.session.slot)
                        if self.loop is not None:  # its row is gone: so is the session (on the loop)
                            with contextlib.suppress(RuntimeError):
                                self.loop.call_soon_threadsafe(self.close_session, op.session, p.INTERNAL)

    def _tick(self, ops: list[_Op]) -> None:
        start = time.monotonic()
        for op in ops:
            if op.kind == "close":  # (a session gets its cache row at its first reset: a storm of
                # hello-and-drop sessions allocates none)
                assert op.session is not None
                self.pool.release(op.session.slot)
            elif op.kind == "call":
                try:
                    _resolve(op, op.payload())
                except Exception as error:
                    _resolve(op, error)
        resets = []
        for op in ops:
            if op.kind == "reset":
                if op.session is None or op.session.closed:
                    _resolve(op, ProtocolError(p.SESSION_EXPIRED, "the session was closed", fatal=True))
                else:
                    if not self.pool.live(op.session.slot):
                        op.session.slot = self.pool.allocate()
                    resets.append(op)
        if resets:
            items, seeds, temperatures = [], [], []
            for op in resets:
                assert op.session is not None
                spec, prompt, goal, seed, temperature = op.payload
                items.append((op.session.slot, spec, prompt, goal))
                seeds.append(seed)
                temperatures.append(temperature)
            for op, failure in zip(resets, self.pool.reset(items, seeds, temperatures), strict=True):
                _resolve(op, failure if failure is not None else True)
        steps: list[_Op] = []
        for op in ops:
            if op.kind != "step":
                continue
            if start > op.deadline:
                late = (start - op.enqueued) * 1000
                _resolve(op, ProtocolError(p.DEADLINE_EXCEEDED, f"the step waited {late:.0f} ms for the model, past its deadline; it was not applied, resend it", "step", f"start within {(op.deadline - op.enqueued) * 1000:.0f} ms", f"{late:.0f} ms"))  # fmt: skip
            elif op.session is None or op.session.closed:
                _resolve(op, ProtocolError(p.SESSION_EXPIRED, "the session was closed", fatal=True))
            else:
                steps.append(op)
        if not steps:
            return
        compute_start = time.monotonic()
        # every observation was checked against its session's spec in step(), before queueing
        results = self.pool.act([(op.session.slot, op.payload) for op in steps], checked=True)  # type: ignore[union-attr]
        compute = time.monotonic() - compute_start
        self._step_seconds = compute if self._step_seconds == 0 else 0.8 * self._step_seconds + 0.2 * compute
        self.observe("batch_size", len(steps))
        self.observe("compute_seconds", compute)
        for op, result in zip(steps, results, strict=True):
            queue = compute_start - op.enqueued
            self.observe("queue_seconds", queue)
            if isinstance(result, Exception):
                _resolve(op, ProtocolError(p.INVALID_OBSERVATION, str(result), "obs"))
            else:
                _resolve(op, StepResult(result, queue * 1000, compute * 1000, len(steps)))


def _resolve(op: _Op, result: Any) -> None:
    """Complete an op's future on its loop (from the worker thread)."""
    if op.future is None or op.loop is None:
        return
    future = op.future

    def complete() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        op.loop.call_soon_threadsafe(complete)


def _violations_error(code: str, what: str, error: SpecMismatchError, prefix: str) -> ProtocolError:
    """An error frame naming every violation (the first one in key/expected/got)."""
    items = [
        {"key": f"{prefix}.{v.key}", "problem": v.problem, "expected": v.expected, "got": v.got}
        for v in error.violations
    ]
    first = items[0]
    summary = "; ".join(f"{i['key']}: {i['problem']}" for i in items)
    return ProtocolError(
        code,
        f"{what} does not match the spec ({len(items)} problem(s)): {summary}",
        first["key"],
        first["expected"],
        first["got"],
        violations=items,
    )
