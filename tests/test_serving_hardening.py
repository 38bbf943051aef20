"""The policy server against hostile or broken clients, on a real loopback server.

A client that never reads is slowed, then closed (bounded send buffers); dropped sessions leave the
session cap after a grace period; connections that never say hello are timed out and capped; and
the smaller protocol checks (deadline range, goal/prompt/array keys in errors, negative steps, the
bearer scheme's case, OVERLOADED's retry hint, bools where integers are expected).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gato_like.checkpoint import load_checkpoint
from gato_like.envs.registry import get_task
from gato_like.serving import protocol as p
from gato_like.serving.client import _DIRECT, PolicyClient
from gato_like.serving.engine import Engine, EngineConfig
from gato_like.serving.loadgen import client_frame, raw_upgrade
from gato_like.serving.protocol import Limits, example_observation
from gato_like.serving.server import PolicyServer, ServerConfig, background_server
from gato_like.tokenizers import SpecMismatchError
from tests.test_serving import TASKS
from tests.test_serving import checkpoint as _debug_checkpoint

checkpoint = _debug_checkpoint  # the same module-scoped fixture: a debug model on TASKS
SMALL = Limits(max_frame_bytes=256 << 10, max_array_bytes=128 << 10)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    with background_server(load_checkpoint(checkpoint), EngineConfig(max_sessions=16), ServerConfig(port=0, limits=SMALL)) as running:  # fmt: skip
        yield running


def _url(server: PolicyServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


def _obs(task: str, rng: np.random.Generator) -> dict:
    return example_observation(get_task(task).spec.to_dict(), rng)


class Raw:
    """A bare WebSocket speaking msgpack frames by hand."""

    def __init__(self, url: str, hello: bool = True, **kwargs) -> None:
        self.ws = connect(url, compression=None, proxy=None, max_size=None, **_DIRECT, **kwargs)
        if hello:
            self.welcome = self.ask({"type": "hello", "version": p.PROTOCOL_VERSION})
            assert self.welcome["type"] == "welcome", self.welcome

    def ask(self, message: dict) -> dict:
        return self.send_bytes(p.encode_frame(message))

    def send_bytes(self, data: bytes) -> dict:
        self.ws.send(data)
        return msgpack.unpackb(self.ws.recv(timeout=10))

    def close(self) -> None:
        self.ws.close()


def _wait_for(condition, timeout: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took (fails the test after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _on_loop(server: PolicyServer, function):
    """Run ``function()`` on the server's event loop (its state is the loop's) and return the result."""

    async def call():
        return function()

    assert server.engine.loop is not None
    return asyncio.run_coroutine_threadsafe(call(), server.engine.loop).result(10)


# -- a raw TCP WebSocket client that can stop reading ----------------------------------------------


# -- 1. a client that never reads ------------------------------------------------------------------


def test_a_client_that_never_reads_is_slowed_then_closed_and_others_are_served(checkpoint: Path) -> None:
    config = ServerConfig(port=0, limits=SMALL, write_limit=32 << 10, send_timeout_s=0.5, max_errors=10_000)
    with background_server(load_checkpoint(checkpoint), EngineConfig(max_sessions=8), config) as server:
        connections = server.metrics.connections._value.get  # handlers running (one per connection)
        sock = raw_upgrade(server.port, receive_buffer=4096)
        # each step names 256 unknown keys: an INVALID_OBSERVATION reply ~15x the request
        bad = p.encode_frame({"type": "step", "step": 0, "obs": {f"k{i}": "" for i in range(256)}})
        frames = [
            client_frame(p.encode_frame({"type": "hello", "version": p.PROTOCOL_VERSION})),
            client_frame(p.encode_frame({"type": "reset", "task": TASKS[0]})),
        ] + [client_frame(bad)] * 600
        sent = threading.Event()

        def flood() -> None:
            sock.settimeout(0.5)  # the server stops reading us: sending then blocks, as it should
            try:
                for frame in frames:
                    sock.sendall(frame)
            except OSError:
                pass
            sent.set()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        start = time.monotonic()
        with PolicyClient(_url(server), task=TASKS[1]) as client:  # another session keeps being served
            for t in range(5):
                assert client.act(_obs(TASKS[1], np.random.default_rng(t))).shape == (1,)
        most_tasks = 0
        while time.monotonic() - start < 10 and connections() > 0:
            most_tasks = max(most_tasks, _on_loop(server, lambda: len(asyncio.all_tasks())))
            time.sleep(0.05)
        closed_after = time.monotonic() - start
        assert connections() == 0, "the client that never reads is still connected"
        assert closed_after < 8, closed_after
        assert most_tasks < 40, f"{most_tasks} tasks on the server loop: requests pile up unbounded"
        flooder.join(10)
        # its session lost its connection (detached, resumable for the grace period)
        assert [s.owner for s in server.engine.sessions.values()] == [None]
        # the TCP connection is gone: what was sent drains, then EOF or a reset
        sock.settimeout(5)
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            while True:
                assert sock.recv(1 << 16)
        sock.close()
        metrics = _on_loop(server, lambda: server.metrics.errors.labels(p.SLOW_CONSUMER)._value.get())
        assert metrics == 1
        with PolicyClient(_url(server), task=TASKS[0]) as client:  # the server is fine
            assert client.act(_obs(TASKS[0], np.random.default_rng(0))).shape == (2,)


# -- 2. dropped sessions and the session cap ---------------------------------------------------------


def test_detached_sessions_are_resumable_within_the_grace_period_then_closed(checkpoint: Path) -> None:
    async def scenario() -> None:
        engine = Engine(load_checkpoint(checkpoint), EngineConfig(max_sessions=2, detached_grace_s=5, idle_timeout_s=300))  # fmt: skip
        await engine.start(warmup=False)
        try:
            kept, dropped = engine.open_session(object()), engine.open_session(object())
            engine.detach_session(dropped)
            now = time.monotonic()
            assert engine.expire_idle(now + 4) == []  # within the grace: still resumable
            assert engine.resume_session(dropped.id, object()) is dropped
            engine.detach_session(dropped)
            assert engine.expire_idle(time.monotonic() + 5.5) == [dropped]  # past it: closed
            assert list(engine.sessions) == [kept.id]
            with pytest.raises(p.ProtocolError) as gone:
                engine.resume_session(dropped.id, object())
            assert gone.value.code == p.UNKNOWN_SESSION
            other = engine.open_session(object())  # the cap has room again
            engine.detach_session(other)
            newest = engine.open_session(object())  # full: the detached session makes room
            assert set(engine.sessions) == {kept.id, newest.id} and other.closed
            with pytest.raises(p.ProtocolError) as full:  # full of attached sessions: refused
                engine.open_session(object())
            assert full.value.code == p.SESSION_LIMIT and full.value.retry_after_ms > 0
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_a_connect_hello_drop_storm_does_not_lock_out_new_clients(checkpoint: Path) -> None:
    engine = EngineConfig(max_sessions=4, detached_grace_s=0.6, idle_timeout_s=300)
    with background_server(load_checkpoint(checkpoint), engine, ServerConfig(port=0)) as server:
        url = _url(server)
        with PolicyClient(url, task=TASKS[1]) as client:  # dropped, then resumed within the grace period
            obs = [_obs(TASKS[1], np.random.default_rng(t)) for t in range(3)]
            client.act(obs[0])
            session = client.session
            client._conn.close()  # type: ignore[union-attr]  # the network drops
            time.sleep(0.2)
            client.act(obs[1])
            assert (
                client.session == session and client.welcome["resumed"] and client.welcome["next_step"] == 1
            )
        ids = []
        for _ in range(4):  # the storm: every session left detached
            raw = Raw(url)
            ids.append(raw.welcome["session"])
            raw.close()
        _wait_for(
            lambda: all(s.owner is None for s in server.engine.sessions.values()), 5, "sessions detached"
        )
        # the cap is full of dropped sessions: the longest-detached one makes room
        fresh = Raw(url)
        assert fresh.welcome["type"] == "welcome" and not fresh.welcome["resumed"]
        assert fresh.welcome["limits"]["detached_grace_s"] == 0.6
        late = Raw(url, hello=False).ask({"type": "hello", "version": 1, "session": ids[0]})
        assert late["code"] == p.UNKNOWN_SESSION and late["fatal"]
        # attached sessions are never evicted: with every session attached a new hello is refused
        held = [Raw(url) for _ in range(3)]
        refused = Raw(url, hello=False).ask({"type": "hello", "version": 1})
        assert refused["code"] == p.SESSION_LIMIT and refused["retry_after_ms"] > 0
        for raw in [fresh, *held]:
            raw.close()
        took = _wait_for(
            lambda: not server.engine.sessions, 5, "dropped sessions closed after the grace period"
        )
        assert took < 3


def test_a_connection_that_sends_only_bad_frames_is_closed(checkpoint: Path) -> None:
    """Each bad frame costs the server a decode and a reply: past max_errors within the window
    the connection is closed (TOO_MANY_ERRORS), and another client is served meanwhile."""
    config = ServerConfig(port=0, max_errors=20, errors_window_s=60)
    with background_server(load_checkpoint(checkpoint), EngineConfig(), config) as server:
        raw = Raw(_url(server))
        codes = [raw.send_bytes(b"\xc1 not msgpack")["code"] for _ in range(20)]
        assert codes == [p.BAD_FRAME] * 20
        last = raw.send_bytes(b"\xc1 not msgpack")
        assert last["code"] == p.TOO_MANY_ERRORS and last["fatal"] and "at most 20 errors" in last["expected"]
        with pytest.raises(ConnectionClosed) as closed:
            raw.ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        with PolicyClient(_url(server), task=TASKS[0]) as client:  # the server is fine
            assert client.act(_obs(TASKS[0], np.random.default_rng(0))).shape == (2,)


# -- 3. connections that never say hello -------------------------------------------------------------


def test_a_connection_that_never_says_hello_is_timed_out(checkpoint: Path) -> None:
    config = ServerConfig(port=0, hello_timeout_s=0.5)
    with background_server(load_checkpoint(checkpoint), EngineConfig(), config) as server:
        silent, chatty = Raw(_url(server), hello=False), Raw(_url(server), hello=False)
        assert chatty.ask({"type": "ping"})["code"] == p.HANDSHAKE_REQUIRED  # not a hello: no reprieve
        for raw in (silent, chatty):
            reply = msgpack.unpackb(raw.ws.recv(timeout=5))
            assert reply["code"] == p.HELLO_TIMEOUT and reply["fatal"] and reply["key"] == "type"
            assert reply["expected"] == "hello within 0.5 s"
            with pytest.raises(ConnectionClosed) as closed:
                raw.ws.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == p.HELLO_TIMEOUT
        on_time = Raw(_url(server))  # a hello in time keeps the connection past the timeout
        time.sleep(0.8)
        assert on_time.ask({"type": "ping", "t": 1})["type"] == "pong"
        on_time.close()


def test_connections_waiting_for_hello_are_capped(checkpoint: Path) -> None:
    config = ServerConfig(port=0, max_pending_connections=2, hello_timeout_s=30)
    with background_server(load_checkpoint(checkpoint), EngineConfig(), config) as server:
        url = _url(server)
        waiting = [Raw(url, hello=False) for _ in range(2)]
        with pytest.raises(InvalidStatus) as refused:
            Raw(url, hello=False)
        response = refused.value.response
        assert response.status_code == 503 and b"max_pending_connections" in response.body
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as health:
            assert health.status == 200  # plain HTTP is not refused
        assert waiting[0].ask({"type": "hello", "version": 1})["type"] == "welcome"  # no longer pending
        admitted = Raw(url)
        assert admitted.welcome["type"] == "welcome"
        waiting[1].close()
        _wait_for(lambda: len(server._pending) == 0, 5, "the closed pending connection leaves the count")
        for raw in (admitted, waiting[0]):
            raw.close()


# -- 4. smaller protocol checks ----------------------------------------------------------------------


def test_deadline_ms_outside_its_range_is_refused(server) -> None:
    raw = Raw(_url(server))
    assert raw.ask({"type": "reset", "task": TASKS[0]})["type"] == "ready"
    obs = p.encode_observation(_obs(TASKS[0], np.random.default_rng(0)))
    for deadline in (0, -5, 0.5, 60_001, 1e12):
        reply = raw.ask({"type": "step", "step": 0, "obs": obs, "deadline_ms": deadline})
        assert reply["code"] == p.BAD_MESSAGE and reply["key"] == "deadline_ms" and not reply["fatal"], reply
        assert reply["expected"] == "a number from 1 to 60000" and reply["got"] == repr(deadline)
    for step, deadline in ((0, 1), (1, 60_000)):
        assert (
            raw.ask({"type": "step", "step": step, "obs": obs, "deadline_ms": deadline})["type"] == "action"
        )
    raw.close()


def test_goal_and_prompt_errors_name_their_own_keys(server) -> None:
    raw = Raw(_url(server))
    rng = np.random.default_rng(0)
    good = _obs(TASKS[0], rng)
    goal = p.encode_observation({**good, "position": np.zeros(3, np.float32)})
    reply = raw.ask({"type": "reset", "task": TASKS[0], "goal": goal})
    assert reply["code"] == p.INVALID_PROMPT and reply["key"] == "goal.position", reply
    assert reply["violations"][0]["key"] == "goal.position" and "goal" in reply["message"]
    steps = {k: np.stack([v, v]) for k, v in good.items()}
    prompt = {"obs": p.encode_observation({**steps, "velocity": np.zeros((2, 3), np.float32)}), "actions": p.encode_array(np.zeros((2, 2), np.float32))}  # fmt: skip
    reply = raw.ask({"type": "reset", "task": TASKS[0], "prompt": prompt})
    assert reply["code"] == p.INVALID_PROMPT and reply["key"] == "prompt.obs.velocity", reply
    prompt = {"obs": p.encode_observation(steps), "actions": p.encode_array(np.zeros((2, 3), np.float32))}
    reply = raw.ask({"type": "reset", "task": TASKS[0], "prompt": prompt})
    assert reply["code"] == p.INVALID_PROMPT and reply["key"] == "prompt.actions", reply
    assert raw.ask({"type": "reset", "task": TASKS[0]})["type"] == "ready"
    raw.close()


def test_an_oversized_array_names_its_key(server) -> None:
    raw = Raw(_url(server))
    assert raw.ask({"type": "reset", "task": TASKS[0]})["type"] == "ready"
    good = p.encode_observation(_obs(TASKS[0], np.random.default_rng(0)))
    size = SMALL.max_array_bytes + 4
    big = {"dtype": "float32", "shape": [size // 4], "data": b"\x00" * size}
    for obs, key in (({**good, "position": big}, "obs.position"), ({**good, "pixels": {**big, "shape": [2]}}, "obs.pixels")):  # fmt: skip
        reply = raw.ask({"type": "step", "step": 0, "obs": obs})
        assert reply["code"] == p.BAD_FRAME and reply["key"] == key and not reply["fatal"], reply
        assert (
            reply["expected"] == f"at most {SMALL.max_array_bytes} bytes" and reply["got"] == f"{size} bytes"
        )
        assert key in reply["message"]
    prompt = {"obs": good, "actions": big}
    reply = raw.ask({"type": "reset", "task": TASKS[0], "prompt": prompt})
    assert reply["code"] == p.BAD_FRAME and reply["key"] == "prompt.actions", reply
    assert raw.ask({"type": "step", "step": 0, "obs": good})["type"] == "action"
    raw.close()


def test_a_negative_step_is_a_bad_message(server) -> None:
    raw = Raw(_url(server))
    obs = p.encode_observation(_obs(TASKS[0], np.random.default_rng(0)))
    for ready in (False, True):  # before and after a reset: the index itself is wrong
        if ready:
            assert raw.ask({"type": "reset", "task": TASKS[0]})["type"] == "ready"
        reply = raw.ask({"type": "step", "step": -1, "obs": obs})
        assert reply["code"] == p.BAD_MESSAGE and reply["key"] == "step" and not reply["fatal"], reply
        assert reply["expected"] == "an integer >= 0" and reply["got"] == "-1"
    assert raw.ask({"type": "step", "step": 0, "obs": obs})["type"] == "action"
    raw.close()


def test_the_bearer_scheme_is_case_insensitive(checkpoint: Path) -> None:
    config = ServerConfig(port=0, token="s3cret-token")
    with background_server(load_checkpoint(checkpoint), EngineConfig(max_sessions=4), config) as server:
        url = _url(server)
        for header in ("bearer s3cret-token", "BEARER s3cret-token", "Bearer  s3cret-token"):
            raw = Raw(url, additional_headers={"Authorization": header})
            assert raw.welcome["type"] == "welcome", header
            raw.close()
        for header in ("bearer wrong", "Basic s3cret-token", "bearers3cret-token", "s3cret-token", "bearer"):
            with pytest.raises(InvalidStatus) as caught:
                Raw(url, additional_headers={"Authorization": header})
            assert caught.value.response.status_code == 401, header
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Authorization": "bearer s3cret-token"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200


def test_overloaded_suggests_a_sensible_retry_delay(checkpoint: Path) -> None:
    engine = Engine(load_checkpoint(checkpoint), EngineConfig(max_batch=4, queue_size=2))
    assert engine.retry_after_ms() >= 10  # no forward pass measured yet: still not 1 ms
    engine._step_seconds = 0.001  # a fast model: the floor holds
    assert engine.retry_after_ms() >= 10
    engine._step_seconds = 0.05  # at least one forward pass
    assert engine.retry_after_ms() >= 50
    engine._pending_steps = 9  # three batches ahead
    assert engine.retry_after_ms() >= 150


def test_discrete_observations_refuse_bools(server) -> None:
    spec = get_task(TASKS[1]).spec
    good = _obs(TASKS[1], np.random.default_rng(0))
    spec.check_step(good)
    with pytest.raises(SpecMismatchError) as caught:
        spec.check_step({**good, "direction": np.bool_(True)})
    (violation,) = caught.value.violations
    assert violation.key == "direction" and violation.problem == "wrong dtype"
    assert violation.expected == "an integer dtype (int64)" and violation.got == "bool"
    raw = Raw(_url(server))
    assert raw.ask({"type": "reset", "task": TASKS[1]})["type"] == "ready"
    reply = raw.ask(
        {"type": "step", "step": 0, "obs": p.encode_observation({**good, "image": good["image"] > 5})}
    )
    assert (
        reply["code"] == p.INVALID_OBSERVATION and reply["key"] == "obs.image" and reply["got"] == "bool"
    ), reply
    assert raw.ask({"type": "step", "step": 0, "obs": p.encode_observation(good)})["type"] == "action"
    raw.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_clients_keep_acting_across_a_server_restart(checkpoint: Path, kind: str) -> None:
    """A restart loses every session: the client's resume gets UNKNOWN_SESSION, so it opens a new
    session, replays its episode's reset and sends the step again as step 0."""
    from gato_like.serving.client import AsyncPolicyClient
    from gato_like.serving.loadgen import free_port

    port = free_port()
    task = "dmc-point_mass-easy"
    observations = [_obs(task, np.random.default_rng(t)) for t in range(4)]
    model = load_checkpoint(checkpoint)

    def restarted() -> background_server:
        return background_server(model, EngineConfig(), ServerConfig(port=port))

    if kind == "sync":
        with restarted():
            client = PolicyClient(f"ws://127.0.0.1:{port}", task=task, retries=20)
            client.connect()
            client.reset()
            client.step(observations[0])
            client.step(observations[1])
            before = client.session
        with restarted():
            reply = client.step(observations[2])
            assert reply["step"] == 0 and client.session != before and client.next_step == 1
            assert client.step(observations[3])["step"] == 1
            client.close()
        return

    async def robot() -> None:
        client = AsyncPolicyClient(f"ws://127.0.0.1:{port}", task=task, retries=20)
        with restarted():
            await client.connect()
            await client.reset()
            await client.step(observations[0])
            before = client.session
        with restarted():
            reply = await client.step(observations[1])
            assert reply["step"] == 0 and client.session != before
            await client.close()

    asyncio.run(robot())


def test_worker_threads_follow_the_cores_and_a_bad_count_is_refused() -> None:
    from gato_like.serving.engine import worker_threads

    assert [worker_threads(n) for n in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 4, 8, 8]
    with pytest.raises(ValueError, match="threads: expected a positive integer or None"):
        EngineConfig(threads=0)
