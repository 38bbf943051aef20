"""The server's settings: ``EngineConfig`` (the model's engine: sessions, batching, deadlines,
threads) and ``ServerConfig`` (the listening socket and its limits). ``gato-like serve`` reads
their fields as its flags. Importing this module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from gato_like.serving.protocol import Limits


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the serving engine (announced to clients in ``welcome.limits``)."""

    max_sessions: int = 64
    """Live sessions at most (attached or awaiting a resume). When full, a new session closes the
    longest-detached one; with every session attached it gets SESSION_LIMIT."""
    max_batch: int = 64
    """Steps per forward pass at most; 1 serves one request at a time (no batching)."""
    queue_size: int = 256
    """Steps waiting for the model at most; more get OVERLOADED with retry_after_ms."""
    step_deadline_ms: float = 1000.0
    """Default time a step may wait before its forward pass starts; later ones get DEADLINE_EXCEEDED."""
    idle_timeout_s: float = 300.0
    """A session with no message for this long is closed (its KV cache freed)."""
    device: str = "cpu"
    """Where the model runs."""
    detached_grace_s: float = 10.0
    """A session whose connection dropped is closed this long after the drop unless resumed first,
    so dropped connections do not hold ``max_sessions`` for the whole ``idle_timeout_s``."""
    threads: int | None = None
    """Intra-op threads of the model's worker (None: :func:`worker_threads`, from the cores)."""

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer or None (auto), got {self.threads!r}")
        for name in ("max_sessions", "max_batch", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("step_deadline_ms", "idle_timeout_s", "detached_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the server listens."""

    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 exposes the server to the network (set a token)."""
    port: int = 8765
    """TCP port (0: any free port)."""
    token: str | None = None
    """Bearer token required at the WebSocket upgrade and for /metrics (None: no authentication)."""
    limits: Limits = field(default_factory=Limits)
    """Frame and array size limits."""
    write_limit: int = 1 << 20
    """High-water mark (bytes) of a connection's unsent replies: above it the server reads none of
    that connection's frames until the client has read enough of its replies (backpressure)."""
    send_timeout_s: float = 10.0
    """A connection whose unsent replies stay above ``write_limit`` this long is closed (1008
    ``SLOW_CONSUMER``; cut off if it does not read the close frame within a second) and its buffers
    are freed."""
    max_queued_frames: int = 16
    """Received frames buffered per connection while its handler is busy; beyond, its socket is not
    read (at most this many frames of up to 4x ``limits.max_frame_bytes`` each)."""
    hello_timeout_s: float = 10.0
    """Seconds a connection has for a successful hello once upgraded, else it is closed
    (``HELLO_TIMEOUT``, 1008); also the time it has to complete the HTTP upgrade."""
    max_pending_connections: int = 64
    """Connections that have not said hello yet, at most; more are refused (HTTP 503 at the upgrade,
    or ``CONNECTION_LIMIT`` and close 1013)."""

    max_errors: int = 50
    """Error replies a connection may cause within ``errors_window_s``; one more closes it
    (``TOO_MANY_ERRORS``, 1008): a client sending nothing but bad frames cannot keep the server's
    CPU busy answering it."""
    errors_window_s: float = 10.0
    """The sliding window of ``max_errors``."""

    def __post_init__(self) -> None:
        for name in ("write_limit", "max_queued_frames", "max_pending_connections", "max_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("send_timeout_s", "hello_timeout_s", "errors_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
