"""A light client of the policy server: numpy, websockets and msgpack only (no torch).

::

    from gato_like.serving.client import PolicyClient

    with PolicyClient("ws://127.0.0.1:8765", task="dmc-point_mass-easy") as client:
        client.reset()                       # optional: act() resets on first use
        action = client.act(observation)     # {key: np.ndarray | str} -> np.ndarray

:class:`AsyncPolicyClient` is the same for asyncio. Both number steps themselves, reconnect after a
dropped connection and resume the session (its KV cache lives on the server), resend the pending
step (the server answers a resent step index with the reply it already gave), and wait out
``OVERLOADED`` replies for their ``retry_after_ms``. Server errors raise :class:`ServerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from gato_like.serving import protocol as p

__all__ = ["AsyncPolicyClient", "PolicyClient", "ServerError"]

# websockets >= 17 wants ``legacy=True`` to hand back a plain connection outside a ``with`` block
_DIRECT: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(sync_connect).parameters else {}

#: Limits the client accepts from the server (generous: the server is trusted more than clients).
CLIENT_LIMITS = p.Limits(max_frame_bytes=64 << 20, max_array_bytes=32 << 20, max_string_bytes=16 << 20, max_keys=4096)  # fmt: skip


class ServerError(RuntimeError):
    """An ``error`` frame from the server. Attributes are its fields (see docs/protocol.md)."""

    def __init__(self, message: Mapping[str, Any]) -> None:
        self.code: str = str(message.get("code"))
        self.message: str = str(message.get("message"))
        self.key: str | None = message.get("key")
        self.expected: str | None = message.get("expected")
        self.got: str | None = message.get("got")
        self.fatal: bool = bool(message.get("fatal"))
        self.violations: list[dict[str, str]] = list(message.get("violations") or [])
        self.retry_after_ms: int | None = message.get("retry_after_ms")
        self.step: int | None = message.get("step")
        detail = f" [{self.key}: expected {self.expected}, got {self.got}]" if self.key else ""
        super().__init__(f"{self.code}: {self.message}{detail}")


#: Close codes the server uses after a fatal error; reconnecting would not help.
REFUSED_CLOSE_CODES = (1008, 1011, 1013)


def _raise_if_refused(error: BaseException) -> None:
    """A connection the server closed after a fatal error (policy violation, internal error, full)
    raises that error instead of a reconnect; its close reason is the error code."""
    if (
        isinstance(error, ConnectionClosed)
        and error.rcvd is not None
        and error.rcvd.code in REFUSED_CLOSE_CODES
    ):
        code = error.rcvd.reason or p.INTERNAL
        raise ServerError({"code": code, "message": f"the server closed the connection ({error.rcvd.code} {code})", "fatal": True}) from error  # fmt: skip


class _Core:
    """State and message building shared by the sync and async clients (no I/O)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        task: str | None,
        embodiment: str | None,
        reconnect: bool,
        retries: int,
        timeout: float,
        name: str,
    ) -> None:
        self.url = url
        self.token = token
        self.task = task
        self.embodiment = embodiment
        self.reconnect = reconnect
        self.retries = retries
        self.timeout = timeout
        self.name = name
        self.session: str | None = None
        self.welcome: dict[str, Any] = {}
        self.next_step = 0
        self.is_reset = False
        self._reset_message: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self.last_timing: dict[str, Any] = {}

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        """Embodiment specs the server announced, ``{name: spec dict}``."""
        return dict(self.welcome.get("specs", {}))

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def hello(self, resume: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "hello", "version": p.PROTOCOL_VERSION, "client": self.name}
        if resume and self.session is not None:
            message["session"] = self.session
        return message

    def accept_welcome(self, reply: dict[str, Any], resumed_wanted: bool) -> None:
        if reply.get("type") == "error":
            raise ServerError(reply)
        if reply.get("type") != "welcome":
            raise ServerError(
                {"code": p.BAD_MESSAGE, "message": f"expected welcome, got {reply.get('type')!r}"}
            )
        self.welcome = reply
        self.session = reply["session"]
        if resumed_wanted and not reply.get("resumed"):
            self.is_reset = False  # a new session: history is gone

    def reset_message(self, task: str | None, embodiment: str | None, prompt: Any, goal: Any, temperature: float = 0.0) -> dict[str, Any]:  # fmt: skip
        message: dict[str, Any] = {"type": "reset"}
        if temperature:
            message["temperature"] = float(temperature)
        task, embodiment = task or self.task, embodiment or self.embodiment
        if task is not None:
            message["task"] = task
        if embodiment is not None:
            message["embodiment"] = embodiment
        if prompt is not None:
            observations, actions = prompt
            message["prompt"] = {
                "obs": p.encode_observation(observations),
                "actions": p.encode_array(actions),
            }
        if goal is not None:
            message["goal"] = p.encode_observation(goal)
        return message

    def step_maker(self, observation: Mapping[str, Any], deadline_ms: float | None) -> Callable[[], dict[str, Any]]:  # fmt: skip
        """A builder of the ``step`` message for ``observation`` (encoded once), numbered with the
        step index current when it is called, so a retry after a reconnect sends the right one."""
        obs = p.encode_observation(observation)

        def make() -> dict[str, Any]:
            message = {"type": "step", "step": self.next_step, "obs": obs}
            if deadline_ms is not None:
                message["deadline_ms"] = deadline_ms
            return message

        return make

    def decode(self, frame: Any) -> dict[str, Any]:
        return p.unpack_frame(frame, CLIENT_LIMITS)

    def action_of(self, reply: dict[str, Any]) -> dict[str, Any]:
        out = dict(reply)
        out["action"] = p.decode_array(reply["action"], "action", CLIENT_LIMITS)
        self.last_timing = dict(reply.get("timing", {}))
        return out

    def with_id(self, message: dict[str, Any]) -> tuple[int, bytes]:
        request_id = next(self._ids)
        return request_id, p.encode_frame({**message, "id": request_id})


class PolicyClient(_Core):
    """Blocking client.

    Args:
        url: ``ws://host:port``.
        token: bearer token, if the server requires one.
        task: task (or use ``embodiment``) for resets that name none.
        embodiment: embodiment for resets that name none.
        reconnect: reconnect and resume after a dropped connection.
        retries: reconnects / OVERLOADED waits per request before giving up.
        timeout: seconds to wait for one reply.
        name: sent in ``hello.client`` (shows in the server's logs).
    """

    def __init__(self, url: str, token: str | None = None, task: str | None = None, embodiment: str | None = None, reconnect: bool = True, retries: int = 5, timeout: float = 10.0, name: str = "gato-like-client") -> None:  # fmt: skip
        super().__init__(url, token, task, embodiment, reconnect, retries, timeout, name)
        self._conn: SyncConnection | None = None

    def __enter__(self) -> PolicyClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> dict[str, Any]:
        """Open the connection and handshake (resuming the session after a reconnect); the welcome."""
        resume = self.session is not None
        self._conn = sync_connect(self.url, additional_headers=self.headers(), compression=None, proxy=None, **_DIRECT, max_size=CLIENT_LIMITS.max_frame_bytes, open_timeout=self.timeout)  # fmt: skip
        request_id, frame = self.with_id(self.hello(resume))
        self._conn.send(frame)
        reply = self._receive(request_id)
        try:
            self.accept_welcome(reply, resume)
        except ServerError as error:
            if not (resume and error.code == p.UNKNOWN_SESSION):
                raise
            # expired, or the server restarted: a new session, with the episode's reset replayed
            self.session, self.is_reset = None, False
            self._conn.close()
            self.connect()
            if self._reset_message is not None:
                self._request(lambda: dict(self._reset_message or {}))
                self.is_reset, self.next_step = True, 0
            return self.welcome
        if resume and not self.is_reset and self._reset_message is not None:
            self._request(lambda: dict(self._reset_message or {}))
            self.is_reset, self.next_step = True, 0
        return self.welcome

    def close(self) -> None:
        """Say bye (the server frees the session) and close."""
        if self._conn is not None:
            try:
                self._conn.send(p.encode_frame({"type": "bye"}))
                self._conn.close()
            except (ConnectionClosed, OSError):
                pass
            self._conn = None
        self.session = None

    def reset(self, task: str | None = None, embodiment: str | None = None, prompt: tuple[Mapping[str, Any], Any] | None = None, goal: Mapping[str, Any] | None = None, temperature: float = 0.0) -> dict[str, Any]:  # fmt: skip
        """Start an episode; ``prompt`` is ``(observations {key: (T, ...)}, actions (T, ...))``; ``temperature`` > 0 samples every action token."""
        message = self.reset_message(task, embodiment, prompt, goal, temperature)
        self._reset_message = None  # a reconnect during this request resends it, not a replay too
        reply = self._request(lambda: dict(message))
        self._reset_message = message
        self.is_reset, self.next_step = True, 0
        return reply

    def step(self, observation: Mapping[str, Any], deadline_ms: float | None = None) -> dict[str, Any]:
        """The full ``action`` reply (``action`` decoded to an array, ``timing``)."""
        if not self.is_reset:
            self.reset()
        reply = self.action_of(self._request(self.step_maker(observation, deadline_ms)))
        self.next_step += 1
        return reply

    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action for one observation ``{key: array | str}``."""
        return np.asarray(self.step(observation)["action"])

    def ping(self) -> float:
        """Round-trip seconds."""
        start = time.perf_counter()
        self._request(lambda: {"type": "ping", "t": time.time()})
        return time.perf_counter() - start

    def _receive(self, request_id: int) -> dict[str, Any]:
        assert self._conn is not None
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._conn.recv(timeout=max(deadline - time.monotonic(), 0.001))
            reply = self.decode(frame)
            if reply.get("id") in (request_id, None):  # errors about undecodable frames carry no id
                return reply

    def _request(self, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    self.connect()
                assert self._conn is not None
                request_id, frame = self.with_id(make())
                self._conn.send(frame)
                reply = self._receive(request_id)
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as error:
                _raise_if_refused(error)
                if isinstance(error, InvalidStatus) or not self.reconnect or attempt >= self.retries:
                    raise ConnectionError(f"policy server {self.url}: {error}") from error
                attempt += 1
                self._drop()
                time.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            if reply.get("type") == "error":
                failure = ServerError(reply)
                if failure.code == p.OVERLOADED and attempt < self.retries:
                    attempt += 1
                    time.sleep((failure.retry_after_ms or 10) / 1000)
                    continue
                if failure.fatal:
                    self._drop()
                raise failure
            return reply

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


class AsyncPolicyClient(_Core):
    """The asyncio twin of :class:`PolicyClient` (same arguments; methods are coroutines)."""

    def __init__(self, url: str, token: str | None = None, task: str | None = None, embodiment: str | None = None, reconnect: bool = True, retries: int = 5, timeout: float = 10.0, name: str = "gato-like-client") -> None:  # fmt: skip
        super().__init__(url, token, task, embodiment, reconnect, retries, timeout, name)
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncPolicyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> dict[str, Any]:
        """Open the connection and handshake (resuming the session after a reconnect); the welcome."""
        resume = self.session is not None
        self._conn = await async_connect(self.url, additional_headers=self.headers(), compression=None, proxy=None, max_size=CLIENT_LIMITS.max_frame_bytes, open_timeout=self.timeout)  # fmt: skip
        request_id, frame = self.with_id(self.hello(resume))
        await self._conn.send(frame)
        reply = await self._receive(request_id)
        try:
            self.accept_welcome(reply, resume)
        except ServerError as error:
            if not (resume and error.code == p.UNKNOWN_SESSION):
                raise
            # expired, or the server restarted: a new session, with the episode's reset replayed
            self.session, self.is_reset = None, False
            await self._conn.close()
            await self.connect()
            if self._reset_message is not None:
                await self._request(lambda: dict(self._reset_message or {}))
                self.is_reset, self.next_step = True, 0
            return self.welcome
        if resume and not self.is_reset and self._reset_message is not None:
            await self._request(lambda: dict(self._reset_message or {}))
            self.is_reset, self.next_step = True, 0
        return self.welcome

    async def close(self) -> None:
        """Say bye (the server frees the session) and close."""
        if self._conn is not None:
            try:
                await self._conn.send(p.encode_frame({"type": "bye"}))
                await self._conn.close()
            except (ConnectionClosed, OSError):
                pass
            self._conn = None
        self.session = None

    async def reset(self, task: str | None = None, embodiment: str | None = None, prompt: tuple[Mapping[str, Any], Any] | None = None, goal: Mapping[str, Any] | None = None, temperature: float = 0.0) -> dict[str, Any]:  # fmt: skip
        """Start an episode; ``prompt`` is ``(observations {key: (T, ...)}, actions (T, ...))``; ``temperature`` > 0 samples every action token."""
        message = self.reset_message(task, embodiment, prompt, goal, temperature)
        self._reset_message = None  # a reconnect during this request resends it, not a replay too
        reply = await self._request(lambda: dict(message))
        self._reset_message = message
        self.is_reset, self.next_step = True, 0
        return reply

    async def step(self, observation: Mapping[str, Any], deadline_ms: float | None = None) -> dict[str, Any]:
        """The full ``action`` reply (``action`` decoded to an array, ``timing``)."""
        if not self.is_reset:
            await self.reset()
        reply = self.action_of(await self._request(self.step_maker(observation, deadline_ms)))
        self.next_step += 1
        return reply

    async def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action for one observation ``{key: array | str}``."""
        return np.asarray((await self.step(observation))["action"])

    async def ping(self) -> float:
        """Round-trip seconds."""
        start = time.perf_counter()
        await self._request(lambda: {"type": "ping", "t": time.time()})
        return time.perf_counter() - start

    async def _receive(self, request_id: int) -> dict[str, Any]:
        assert self._conn is not None
        deadline = time.monotonic() + self.timeout
        while True:
            frame = await asyncio.wait_for(self._conn.recv(), max(deadline - time.monotonic(), 0.001))
            reply = self.decode(frame)
            if reply.get("id") in (request_id, None):
                return reply

    async def _request(self, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    await self.connect()
                assert self._conn is not None
                request_id, frame = self.with_id(make())
                await self._conn.send(frame)
                reply = await self._receive(request_id)
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as error:
                _raise_if_refused(error)
                if isinstance(error, InvalidStatus) or not self.reconnect or attempt >= self.retries:
                    raise ConnectionError(f"policy server {self.url}: {error}") from error
                attempt += 1
                await self._drop()
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            if reply.get("type") == "error":
                failure = ServerError(reply)
                if failure.code == p.OVERLOADED and attempt < self.retries:
                    attempt += 1
                    await asyncio.sleep((failure.retry_after_ms or 10) / 1000)
                    continue
                if failure.fatal:
                    await self._drop()
                raise failure
            return reply

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None
