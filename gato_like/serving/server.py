"""The policy server: a WebSocket endpoint (binary msgpack frames) in front of :class:`Engine`.

One port serves everything: WebSocket upgrades (robots), ``GET /healthz`` (the process is up),
``GET /readyz`` (the model is loaded and warmed up), ``GET /metrics`` (Prometheus text format).
A bearer token, when set, is checked at the HTTP upgrade (and for ``/metrics``) with a constant-time
comparison; a connection without it never reaches the handler. Binds 127.0.0.1 unless told otherwise.
Hostile or broken clients are bounded (:class:`ServerConfig`): a connection that does not read its
replies is slowed (its frames are not read), then closed; one that does not say hello in time is
closed, and only so many may wait for their hello at once.
The protocol is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import http
import json
import logging
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from gato_like import __version__
from gato_like.checkpoint import Checkpoint, load_checkpoint
from gato_like.serving import protocol as p
from gato_like.serving.config import EngineConfig, ServerConfig
from gato_like.serving.engine import Engine, Session
from gato_like.serving.protocol import ProtocolError

log = logging.getLogger("gato_like.serving")

MAX_REQUESTS_PER_CONNECTION = 8
"""Resets and steps of one connection answered at once; the handler reads none of its frames until
one of them is done (a step is answered in turn; extra ones only get BUSY)."""
CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_LATER = 1008, 1011, 1013
"""WebSocket close codes after a fatal error (the close reason is the error code): policy violation,
server error, a limit that may clear later (SESSION_LIMIT, CONNECTION_LIMIT)."""
SERVER_SIDE = frozenset({p.OVERLOADED, p.DEADLINE_EXCEEDED, p.INTERNAL})
"""Error codes that say the server is busy or broken, not that the request was bad: they do not
count towards a connection's ``max_errors``."""

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event`` and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs of the serving package on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gato_like.serving")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_latency = Histogram("gato_serve_step_latency_seconds", "Server time of a step: frame received to reply sent", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("gato_serve_queue_wait_seconds", "Time a step waited for its forward pass", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.compute = Histogram("gato_serve_batch_compute_seconds", "Time of one batched forward (observation and action tokens)", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("gato_serve_batch_size", "Steps acted for in one forward pass", buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.steps = Counter("gato_serve_steps", "Actions returned (resent replies included)", registry=r)
        self.errors = Counter("gato_serve_errors", "Error frames sent, by code", ["code"], registry=r)
        self.connections = Gauge("gato_serve_connections", "Open WebSocket connections", registry=r)
        sessions = Gauge("gato_serve_sessions", "Live sessions (attached or awaiting resume)", registry=r)
        sessions.set_function(lambda: len(engine.sessions))
        queued = Gauge("gato_serve_queued_steps", "Steps waiting for the model", registry=r)
        queued.set_function(lambda: engine.pending_steps)
        ready = Gauge("gato_serve_ready", "1 when the model is loaded and warmed up", registry=r)
        ready.set_function(lambda: float(engine.ready))

    def observe(self, name: str, value: float) -> None:
        """The engine's hook (called on its worker thread)."""
        if name == "batch_size":
            self.batch_size.observe(value)
        elif name == "compute_seconds":
            self.compute.observe(value)
        elif name == "queue_seconds":
            self.queue_wait.observe(value)


class PolicyServer:
    """The WebSocket policy server over one checkpoint.

    Args:
        checkpoint: the loaded checkpoint.
        engine: limits of the engine (sessions, batching, queue, deadlines, expiry).
        config: host, port, token and frame limits.
    """

    def __init__(self, checkpoint: Checkpoint, engine: EngineConfig | None = None, config: ServerConfig | None = None) -> None:  # fmt: skip
        self.checkpoint = checkpoint
        self.config = config or ServerConfig()
        self.engine = Engine(checkpoint, engine or EngineConfig())
        self.metrics = Metrics(self.engine)
        self.engine.observe = self.metrics.observe
        self.limits = self.config.limits
        self._server: Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._owners: dict[str, ServerConnection] = {}  # session id -> attached connection
        self._pending: set[ServerConnection] = set()  # connections that have not said hello yet
        # times of each connection's error replies (weak: a request can outlive its connection)
        self._errors: weakref.WeakKeyDictionary[ServerConnection, collections.deque[float]] = (
            weakref.WeakKeyDictionary()
        )
        self._slow: weakref.WeakSet[ServerConnection] = weakref.WeakSet()  # being dropped: not reading
        self._notices: set[asyncio.Task[None]] = set()  # errors sent without waiting for the client

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen, then load the model into the worker and warm it up (``/readyz`` turns 200)."""
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            compression=None,
            max_size=4 * self.limits.max_frame_bytes,  # between 1x and 4x: an error frame; above: close 1009
            max_queue=self.config.max_queued_frames,
            write_limit=self.config.write_limit,
            open_timeout=self.config.hello_timeout_s,
            server_header=f"gato-like/{__version__}",
        )
        log.info("listening", extra={"fields": {"host": self.config.host, "port": self.port, "auth": self.config.token is not None}})  # fmt: skip
        started = time.monotonic()
        await self.engine.start()
        log.info("ready", extra={"fields": {"warmup_s": round(time.monotonic() - started, 3), "embodiments": sorted(self.checkpoint.specs), "threads": self.engine.threads}})  # fmt: skip
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self) -> None:
        """Close every connection and stop the worker."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.engine.stop()

    # HTTP

    def _authorized(self, headers: Headers) -> bool:
        """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 7235), the token is
        compared in constant time."""
        if self.config.token is None:
            return True
        scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8", "replace"), self.config.token.encode())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.engine.ready:
                return connection.respond(http.HTTPStatus.OK, "ready\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "warming up\n")
        if not self._authorized(request.headers):
            self.metrics.errors.labels("UNAUTHORIZED").inc()
            log.warning("unauthorized", extra={"fields": {"path": path, "remote": _remote(connection)}})
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="gato-like"'
            return response
        if path == "/metrics":
            response = connection.respond(http.HTTPStatus.OK, generate_latest(self.metrics.registry).decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        cap = self.config.max_pending_connections
        if len(self._pending) >= cap:
            self.metrics.errors.labels(p.CONNECTION_LIMIT).inc()
            log.warning("connection_limit", extra={"fields": {"pending": len(self._pending), "remote": _remote(connection)}})  # fmt: skip
            response = connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{len(self._pending)} connections are waiting to say hello (max_pending_connections {cap}); retry later\n")  # fmt: skip
            response.headers["Retry-After"] = str(max(1, round(self.config.hello_timeout_s)))
            return response
        return None  # a WebSocket upgrade

    # WebSocket

    async def _send(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        """Send one frame. It waits while the connection's unsent replies are above ``write_limit``;
        if that lasts ``send_timeout_s`` the client is not reading and is dropped."""
        try:
            await asyncio.wait_for(connection.send(p.encode_frame(message)), self.config.send_timeout_s)
        except ConnectionClosed:
            pass
        except asyncio.TimeoutError:
            await self._drop_slow(connection)

    async def _drop_slow(self, connection: ServerConnection) -> None:
        """Close a connection that leaves its replies unread (1008 ``SLOW_CONSUMER``), freeing them."""
        if connection in self._slow:
            return
        self._slow.add(connection)
        self.metrics.errors.labels(p.SLOW_CONSUMER).inc()
        unsent = connection.transport.get_write_buffer_size() if connection.transport else None
        log.warning("slow_consumer", extra={"fields": {"remote": _remote(connection), "unsent_bytes": unsent, "write_limit": self.config.write_limit, "send_timeout_s": self.config.send_timeout_s}})  # fmt: skip
        await self._close(connection, CLOSE_POLICY, p.SLOW_CONSUMER, min(1.0, self.config.send_timeout_s))

    async def _close(self, connection: ServerConnection, code: int, reason: str, wait: float | None = None) -> None:  # fmt: skip
        """Close with ``code`` and ``reason``; a client that does not take the close frame within
        ``wait`` seconds (default ``send_timeout_s``) is cut off, so its buffers are freed."""
        try:
            await asyncio.wait_for(connection.close(code, reason), self.config.send_timeout_s if wait is None else wait)  # fmt: skip
        except asyncio.TimeoutError:
            connection.transport.abort()

    def _notify(self, connection: ServerConnection, error: ProtocolError, session: Session | None = None) -> None:  # fmt: skip
        """Send an error the server raises on its own (and close, if fatal) without waiting on that
        client."""
        task = asyncio.create_task(self._send_error(connection, error, session=session))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _send_error(self, connection: ServerConnection, error: ProtocolError, request_id: int | None = None, step: int | None = None, session: Session | None = None) -> None:  # fmt: skip
        if not error.fatal and error.code not in SERVER_SIDE and connection.state is State.OPEN:
            times = self._errors.setdefault(connection, collections.deque())
            now = time.monotonic()
            times.append(now)
            while times and times[0] < now - self.config.errors_window_s:
                times.popleft()
            if len(times) > self.config.max_errors:
                window = f"{self.config.errors_window_s:g} s"
                error = ProtocolError(p.TOO_MANY_ERRORS, f"{len(times)} bad requests within {window} (last: {error.code}: {_clip(error.message, 120)}); closing", error.key, f"at most {self.config.max_errors} errors within {window}", str(len(times)), fatal=True)  # fmt: skip
        self.metrics.errors.labels(error.code).inc()
        log.warning("error", extra={"fields": {"code": error.code, "message": _clip(error.message), "key": error.key, "fatal": error.fatal, "session": session.id if session else None, "remote": _remote(connection)}})  # fmt: skip
        await self._send(connection, error.to_message(request_id, step))
        if error.fatal:
            later = error.code in (p.SESSION_LIMIT, p.CONNECTION_LIMIT)
            close = CLOSE_TRY_LATER if later else CLOSE_INTERNAL if error.code == p.INTERNAL else CLOSE_POLICY
            await self._close(connection, close, error.code)

    async def _handle(self, connection: ServerConnection) -> None:
        self.metrics.connections.inc()
        session: Session | None = None
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        hello_by = loop.time() + self.config.hello_timeout_s
        log.info("connect", extra={"fields": {"remote": _remote(connection)}})
        try:
            if len(self._pending) >= self.config.max_pending_connections:  # upgrades that raced the check
                cap = self.config.max_pending_connections
                await self._send_error(connection, ProtocolError(p.CONNECTION_LIMIT, f"{len(self._pending)} connections are waiting to say hello; retry later", None, f"at most {cap} connections without a hello", str(len(self._pending)), fatal=True))  # fmt: skip
                return
            self._pending.add(connection)
            while True:
                if session is None:  # before the welcome: only until hello_by
                    try:
                        if loop.time() >= hello_by:
                            raise asyncio.TimeoutError
                        frame = await asyncio.wait_for(connection.recv(), hello_by - loop.time())
                    except asyncio.TimeoutError:
                        wait = f"{self.config.hello_timeout_s:g} s"
                        await self._send_error(connection, ProtocolError(p.HELLO_TIMEOUT, f"no hello within {wait} of connecting", "type", f"hello within {wait}", "no hello", fatal=True))  # fmt: skip
                        return
                else:
                    frame = await connection.recv()
                request_id: int | None = None
                try:
                    raw = p.unpack_frame(frame, self.limits)
                    request_id = raw.get("id") if isinstance(raw.get("id"), int) else None
                    message = p.parse_message(raw, self.limits)
                except ProtocolError as error:
                    await self._send_error(connection, error, request_id, session=session)
                    continue
                if session is not None and (session.closed or self._owners.get(session.id) is not connection):
                    why = "expired" if session.closed else "was resumed by another connection"
                    await self._send_error(connection, ProtocolError(p.SESSION_EXPIRED, f"the session {why}", fatal=True), message.id, session=session)  # fmt: skip
                    return
                if message.type == "hello":
                    session = await self._hello(connection, message, session)
                    if session is not None:
                        self._pending.discard(connection)
                    continue
                if session is None:
                    early = ProtocolError(
                        p.HANDSHAKE_REQUIRED, "send hello first", "type", "hello", message.type
                    )
                    await self._send_error(connection, early, message.id)
                    continue
                if message.type == "ping":
                    await self._send(connection, _with_id({"type": "pong", "t": message.fields.get("t"), "server_time": time.time()}, message.id))  # fmt: skip
                elif message.type == "bye":
                    self.engine.close_session(session, "bye")
                    self._owners.pop(session.id, None)
                    await self._send(connection, _with_id({"type": "bye"}, message.id))
                    await self._close(connection, 1000, "bye")
                    return
                else:  # reset, step: concurrently, so pings and resent steps are answered meanwhile
                    while len(tasks) >= MAX_REQUESTS_PER_CONNECTION:  # backpressure: read no more
                        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.create_task(self._request(connection, session, message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except ConnectionClosed:
            pass
        finally:
            self._pending.discard(connection)
            self._errors.pop(connection, None)
            self.metrics.connections.dec()
            if session is not None and self._owners.get(session.id) is connection:
                self._owners.pop(session.id, None)
                if not session.closed:
                    self.engine.detach_session(session)  # kept for a resume for detached_grace_s
            log.info("disconnect", extra={"fields": {"remote": _remote(connection), "session": session.id if session else None}})  # fmt: skip

    async def _hello(self, connection: ServerConnection, message: p.Message, current: Session | None) -> Session | None:  # fmt: skip
        version = message.fields["version"]
        if version != p.PROTOCOL_VERSION:
            await self._send_error(connection, ProtocolError(p.VERSION_MISMATCH, f"this server speaks protocol version {p.PROTOCOL_VERSION}", "version", str(p.PROTOCOL_VERSION), str(version), fatal=True), message.id)  # fmt: skip
            return current
        if current is not None:
            await self._send_error(connection, ProtocolError(p.BAD_MESSAGE, "hello was already sent on this connection", "type", "reset, step, ping or bye", "hello"), message.id, session=current)  # fmt: skip
            return current
        try:
            if "session" in message.fields:
                session = self.engine.resume_session(message.fields["session"], connection)
                previous = self._owners.get(session.id)
                resumed = True
            else:
                session = self.engine.open_session(connection)
                previous, resumed = None, False
        except ProtocolError as error:
            await self._send_error(connection, error, message.id)
            return None
        self._owners[session.id] = connection
        if previous is not None and previous is not connection:
            self._notify(previous, ProtocolError(p.SESSION_EXPIRED, "the session was resumed by another connection", fatal=True), session)  # fmt: skip
        config, engine = self.checkpoint.model.config, self.engine.config
        welcome = {
            "type": "welcome",
            "version": p.PROTOCOL_VERSION,
            "server": f"gato-like {__version__}",
            "session": session.id,
            "resumed": resumed,
            "next_step": session.next_step if session.spec is not None else None,
            "embodiment": session.spec.name if session.spec is not None else None,
            "specs": {name: spec.to_dict() for name, spec in self.checkpoint.specs.items()},
            "tasks": {name: task.get("embodiment", name) for name, task in self.checkpoint.tasks.items()},
            "limits": {
                **self.limits.to_dict(),
                "max_sessions": engine.max_sessions,
                "max_batch": engine.max_batch,
                "queue_size": engine.queue_size,
                "step_deadline_ms": engine.step_deadline_ms,
                "idle_timeout_s": engine.idle_timeout_s,
                "detached_grace_s": engine.detached_grace_s,
                "write_limit": self.config.write_limit,
                "send_timeout_s": self.config.send_timeout_s,
            },
            "model": {
                "preset": config.name,
                "backbone": config.backbone,
                "context_length": config.context_length,
            },
        }
        await self._send(connection, _with_id(welcome, message.id))
        log.info("hello", extra={"fields": {"session": session.id, "resumed": resumed, "client": message.fields.get("client"), "remote": _remote(connection)}})  # fmt: skip
        return session

    async def _request(self, connection: ServerConnection, session: Session, message: p.Message) -> None:
        received = time.monotonic()
        step: int | None = message.fields.get("step")
        try:
            if message.type == "reset":
                f = message.fields
                spec = await self.engine.reset(session, f.get("task"), f.get("embodiment"), f.get("prompt"), f.get("goal"), f.get("temperature", 0.0))  # fmt: skip
                reply = {"type": "ready", "embodiment": spec.name, "task": session.task, "next_step": 0}
            else:
                reply = dict(await self.engine.step(session, message.fields["step"], message.fields["obs"], message.fields.get("deadline_ms")))  # fmt: skip
        except ProtocolError as error:
            if error.fatal:
                self._owners.pop(session.id, None)
            await self._send_error(connection, error, message.id, step, session)
            return
        except Exception as error:  # a bug; the session cannot be trusted any more
            log.exception("request_failed", extra={"fields": {"session": session.id}})
            self.engine.close_session(session, p.INTERNAL)
            self._owners.pop(session.id, None)
            await self._send_error(connection, ProtocolError(p.INTERNAL, f"server error: {type(error).__name__}", fatal=True), message.id, step, session)  # fmt: skip
            return
        await self._send(connection, _with_id(reply, message.id))
        if message.type == "step":
            self.metrics.steps.inc()
            self.metrics.step_latency.observe(time.monotonic() - received)

    async def _reap(self) -> None:
        """Close idle sessions and detached ones past their grace period; tell their connection (if
        any) why, without waiting on it."""
        config = self.engine.config
        period = min(1.0, config.idle_timeout_s / 4, config.detached_grace_s / 4)
        while True:
            await asyncio.sleep(period)
            for session in self.engine.expire_idle():
                connection = self._owners.pop(session.id, None)
                if connection is not None:
                    error = ProtocolError(p.SESSION_EXPIRED, f"no message for {config.idle_timeout_s:g} s; the session was closed", fatal=True)  # fmt: skip
                    self._notify(connection, error, session)


def _with_id(message: dict[str, Any], request_id: int | None) -> dict[str, Any]:
    if request_id is not None:
        message["id"] = request_id
    return message


def _remote(connection: ServerConnection) -> str | None:
    try:
        address = connection.remote_address
        return f"{address[0]}:{address[1]}" if address else None
    except Exception:
        return None


async def run(server: PolicyServer, stop: asyncio.Event | None = None) -> None:
    """Start ``server`` and serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()


def serve_checkpoint(
    ckpt: str | Path,
    config: ServerConfig | None = None,
    engine: EngineConfig | None = None,
) -> None:
    """Load a checkpoint and serve it until interrupted (``gato-like serve``)."""
    engine = engine or EngineConfig()
    checkpoint = load_checkpoint(ckpt, engine.device)
    asyncio.run(run(PolicyServer(checkpoint, engine, config)))


@contextlib.contextmanager
def background_server(
    checkpoint: Checkpoint, engine: EngineConfig | None = None, config: ServerConfig | None = None
) -> Iterator[PolicyServer]:
    """A server on its own thread and event loop, ready on entry and stopped on exit (tests, demos).
    Use ``server.port`` to connect."""
    config = config or ServerConfig(port=0)
    server = PolicyServer(checkpoint, engine, config)
    started = threading.Event()
    failure: list[BaseException] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            await server.start()
        except BaseException as error:
            failure.append(error)
            started.set()
            raise
        started.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="gato-like-server", daemon=True)  # fmt: skip
    thread.start()
    started.wait(120)
    if failure:
        thread.join(5)
        raise failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def _clip(text: str, limit: int = 300) -> str:
    """A log field of at most ``limit`` characters: a client cannot make one bad frame cost the
    server's log (and its stderr pipe) an unbounded line (a reply still names every violation)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
