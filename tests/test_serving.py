"""The policy server end to end: a real server on a loopback port and real clients.

Round trip and handshake; concurrent sessions (two embodiments, one with a prompt) get the actions
the runtime agent computes locally; bad frames, bad messages, bad tokens and invalid observations
are answered with errors while the connection, the session and the server stay usable; queue
limits, deadlines, session cap and idle expiry of the engine; reconnect and resume; the frame
decoder under property-based fuzzing; the client imports without torch; the load generator.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gato_like.checkpoint import load_checkpoint, save_checkpoint
from gato_like.config import Config
from gato_like.envs.registry import get_task
from gato_like.model import GatoModel
from gato_like.policy import Policy
from gato_like.serving import protocol as p
from gato_like.serving.client import _DIRECT, AsyncPolicyClient, PolicyClient, ServerError
from gato_like.serving.engine import Engine, EngineConfig
from gato_like.serving.protocol import Limits, ProtocolError, example_observation
from gato_like.serving.server import ServerConfig, background_server
from gato_like.tokenizers import TextTokenizer

TASKS = ("dmc-point_mass-easy", "babyai-GoToRedBall")  # the smoke suite's two embodiments that act
SMALL = Limits(max_frame_bytes=256 << 10, max_array_bytes=128 << 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug"))  # context 256: a BabyAI step (~156 tokens) rolls over
    specs = {get_task(t).spec.name: get_task(t).spec for t in TASKS}
    tasks = {t: {"embodiment": get_task(t).spec.name} for t in TASKS}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "debug", model, TextTokenizer(), specs, tasks)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    with background_server(load_checkpoint(checkpoint), EngineConfig(max_sessions=16), ServerConfig(port=0, limits=SMALL)) as running:  # fmt: skip
        yield running


def _url(server) -> str:
    return f"ws://127.0.0.1:{server.port}"


class Raw:
    """A bare WebSocket speaking msgpack frames by hand."""

    def __init__(self, url: str, hello: bool = True, **kwargs) -> None:
        self.ws = connect(url, compression=None, proxy=None, max_size=None, **_DIRECT, **kwargs)
        if hello:
            welcome = self.ask({"type": "hello", "version": p.PROTOCOL_VERSION})
            assert welcome["type"] == "welcome", welcome
            self.welcome = welcome

    def send_bytes(self, data: bytes | str) -> dict:
        self.ws.send(data)
        return msgpack.unpackb(self.ws.recv(timeout=10))

    def ask(self, message: dict) -> dict:
        return self.send_bytes(p.encode_frame(message))

    def close(self) -> None:
        self.ws.close()


def _obs(task: str, rng: np.random.Generator) -> dict:
    return example_observation(get_task(task).spec.to_dict(), rng)


# -- round trip ----------------------------------------------------------------------------------


def test_round_trip_handshake_step_indices_and_ping(server) -> None:
    raw = Raw(_url(server))
    welcome = raw.welcome
    assert welcome["version"] == p.PROTOCOL_VERSION and len(welcome["session"]) == 32
    assert set(welcome["specs"]) == {"point_mass", "babyai"}
    assert welcome["specs"]["point_mass"] == get_task(TASKS[0]).spec.to_dict()
    assert welcome["tasks"]["babyai-GoToRedBall"] == "babyai"
    assert welcome["limits"]["max_frame_bytes"] == SMALL.max_frame_bytes and welcome["limits"]["max_sessions"] == 16  # fmt: skip
    rng = np.random.default_rng(0)
    obs = p.encode_observation(_obs(TASKS[0], rng))
    early = raw.ask({"type": "step", "id": 1, "step": 0, "obs": obs})
    assert (
        early["type"] == "error" and early["code"] == p.NOT_RESET and not early["fatal"] and early["id"] == 1
    )
    ready = raw.ask({"type": "reset", "id": 2, "task": TASKS[0]})
    assert ready == {"type": "ready", "embodiment": "point_mass", "task": TASKS[0], "next_step": 0, "id": 2}
    first = raw.ask({"type": "step", "id": 3, "step": 0, "obs": obs})
    assert first["type"] == "action" and first["step"] == 0 and first["id"] == 3
    action = p.decode_array(first["action"], "action")
    assert action.shape == (2,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
    assert set(first["timing"]) == {"validate_ms", "queue_ms", "compute_ms", "batch_size", "total_ms"}
    assert first["timing"]["batch_size"] >= 1 and first["timing"]["total_ms"] >= first["timing"]["compute_ms"] > 0  # fmt: skip
    second = raw.ask({"type": "step", "id": 4, "step": 1, "obs": obs})
    resent = raw.ask({"type": "step", "id": 5, "step": 1, "obs": obs})
    assert {**resent, "id": 4} == second  # the same reply, timing included
    stale = raw.ask({"type": "step", "id": 6, "step": 0, "obs": obs})
    assert stale["code"] == p.STALE_STEP and stale["got"] == "0" and not stale["fatal"]
    gap = raw.ask({"type": "step", "id": 7, "step": 5, "obs": obs})
    assert gap["code"] == p.STEP_GAP and gap["expected"] == "2"
    pong = raw.ask({"type": "ping", "id": 8, "t": 1.5})
    assert pong["type"] == "pong" and pong["t"] == 1.5 and pong["id"] == 8
    again = raw.ask({"type": "hello", "version": p.PROTOCOL_VERSION})
    assert again["code"] == p.BAD_MESSAGE and not again["fatal"]
    assert raw.ask({"type": "step", "step": 2, "obs": obs})["type"] == "action"
    assert raw.ask({"type": "bye"})["type"] == "bye"
    raw.close()


def test_concurrent_sessions_get_the_local_policys_actions(server, checkpoint: Path) -> None:
    episode = {"obs": None}
    rng = np.random.default_rng(1)
    prompt_obs = {k: np.stack([_obs(TASKS[0], rng)[k] for _ in range(2)]) if k != "pixels" else rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8) for k in get_task(TASKS[0]).spec.observations}  # fmt: skip
    prompt_actions = rng.uniform(-1, 1, (2, 2)).astype(np.float32)
    episode["obs"] = prompt_obs
    plans = [(TASKS[i % 2], i == 4) for i in range(6)]  # (task, with a prompt)
    steps = 8
    observations = [[_obs(task, np.random.default_rng(100 + i * 31 + t)) for t in range(steps)] for i, (task, _) in enumerate(plans)]  # fmt: skip

    async def robot(i: int) -> tuple[list[np.ndarray], list[int]]:
        task, prompted = plans[i]
        async with AsyncPolicyClient(_url(server), task=task) as client:
            await client.reset(prompt=(prompt_obs, prompt_actions) if prompted else None)
            actions, batches = [], []
            for t in range(steps):
                reply = await client.step(observations[i][t])
                actions.append(reply["action"])
                batches.append(reply["timing"]["batch_size"])
            return actions, batches

    async def all_robots():
        return await asyncio.gather(*(robot(i) for i in range(len(plans))))

    served = asyncio.run(all_robots())
    assert max(b for _, batches in served for b in batches) > 1  # sessions shared forward passes
    for i, (task, prompted) in enumerate(plans):
        local = Policy.from_checkpoint(checkpoint)
        local.reset(task, prompt=(prompt_obs, prompt_actions) if prompted else None)
        for t in range(steps):
            np.testing.assert_allclose(served[i][0][t], local.act(observations[i][t]), atol=1e-6, err_msg=f"session {i} step {t}")  # fmt: skip


def test_sampled_discrete_actions_are_seeded_per_episode_and_match_the_local_policy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", discrete_decoding="sample"))
    specs = {get_task(t).spec.name: get_task(t).spec for t in TASKS}
    tasks = {t: {"embodiment": get_task(t).spec.name} for t in TASKS}
    path = save_checkpoint(tmp_path / "sample", model, TextTokenizer(), specs, tasks)
    steps = 10
    observations = {task: [_obs(task, np.random.default_rng(t)) for t in range(steps)] for task in TASKS}

    def episodes(policy: Policy, count: int = 2) -> list[list[int]]:
        out = []
        for _ in range(count):
            policy.reset(TASKS[1])
            out.append([int(policy.act(o)[0]) for o in observations[TASKS[1]]])
        return out

    local = episodes(Policy.from_checkpoint(path))
    assert local == episodes(Policy.from_checkpoint(path))  # seeded: a new policy repeats them
    assert local[0] != local[1]  # each episode its own draws
    argmax = Policy.from_checkpoint(path)
    argmax.model.config.discrete_decoding = "argmax"
    assert episodes(argmax, 1)[0] not in local  # it did sample

    async def robot(url: str, task: str) -> list[list[int]]:
        out = []
        async with AsyncPolicyClient(url, task=task) as client:
            for _ in range(2):
                await client.reset()
                out.append([int((await client.step(o))["action"][0]) for o in observations[task]])
        return out

    async def both(url: str) -> list[list[list[int]]]:  # a continuous session shares the passes
        return await asyncio.gather(robot(url, TASKS[1]), robot(url, TASKS[0]))

    with background_server(load_checkpoint(path), EngineConfig(), ServerConfig(port=0)) as server:
        served, _ = asyncio.run(both(_url(server)))
    assert served == local  # the session's episodes are the local policy's


# -- bad input -----------------------------------------------------------------------------------


def test_bad_frames_are_answered_and_the_connection_stays_usable(server) -> None:
    raw = Raw(_url(server))
    cases = [
        (b"\xc1\xff\x00garbage", p.BAD_FRAME, None),
        ("a text frame", p.BAD_FRAME, None),
        (msgpack.packb(42), p.BAD_FRAME, None),
        (msgpack.packb({"step": 1}), p.BAD_MESSAGE, "type"),
        (msgpack.packb({"type": 7}), p.BAD_MESSAGE, "type"),
        (msgpack.packb({"type": "fly"}), p.UNKNOWN_TYPE, "type"),
        (msgpack.packb({"type": "step", "step": "one", "obs": {}}), p.BAD_MESSAGE, "step"),
        (msgpack.packb({"type": "step", "step": 0}), p.BAD_MESSAGE, "step"[:0] + "obs"),
        (msgpack.packb({"type": "ping", "colour": "red"}), p.BAD_MESSAGE, "colour"),
        (msgpack.packb({"type": "reset", "task": ["a"]}), p.BAD_MESSAGE, "task"),
        (msgpack.packb({"type": "ping", "id": -3}), p.BAD_MESSAGE, "id"),
        (msgpack.packb({"type": "ping", "t": msgpack.ExtType(5, b"x")}), p.BAD_FRAME, None),
        (msgpack.packb([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]), p.BAD_FRAME, None),
        (b"\x00" * (SMALL.max_frame_bytes + 1), p.BAD_FRAME, None),  # above the limit, below the hard cap
    ]  # fmt: skip
    for frame, code, key in cases:
        reply = raw.send_bytes(frame)
        assert reply["type"] == "error" and reply["code"] == code, (frame[:40], reply)
        assert not reply["fatal"] and reply["message"]
        if key is not None:
            assert reply["key"] == key, reply
    arrays = [
        ({"dtype": "complex64", "shape": [2], "data": b"\x00" * 16}, "obs.position.dtype"),
        ({"dtype": "float32", "shape": [2], "data": b"\x00" * 7}, "obs.position.data"),
        ({"dtype": "float32", "shape": [1 << 20, 1 << 10], "data": b""}, "obs.position"),
        ({"dtype": "float32", "shape": "2", "data": b""}, "obs.position.shape"),
        ({"dtype": "float32", "shape": [2], "data": b"\x00" * 8, "pickle": 1}, "obs.position.pickle"),
    ]
    assert raw.ask({"type": "reset", "task": TASKS[0]})["type"] == "ready"
    good = p.encode_observation(_obs(TASKS[0], np.random.default_rng(0)))
    for array, key in arrays:
        reply = raw.ask({"type": "step", "step": 0, "obs": {**good, "position": array}})
        assert reply["type"] == "error" and reply["key"] == key, reply
    assert raw.ask({"type": "step", "step": 0, "obs": good})["type"] == "action"
    raw.close()
    # past the hard cap (4x the frame limit) the server closes that connection (1009), and lives on
    raw = Raw(_url(server))
    raw.ws.send(b"\x00" * (4 * SMALL.max_frame_bytes + 1))
    with pytest.raises(ConnectionClosed) as closed:
        raw.ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with PolicyClient(_url(server), task=TASKS[1]) as client:
        assert client.act(_obs(TASKS[1], np.random.default_rng(0))).shape == (1,)


def test_handshake_rules(server) -> None:
    raw = Raw(_url(server), hello=False)
    reply = raw.ask({"type": "ping"})
    assert reply["code"] == p.HANDSHAKE_REQUIRED and not reply["fatal"]
    reply = raw.ask({"type": "hello", "version": 99})
    assert reply["code"] == p.VERSION_MISMATCH and reply["fatal"] and reply["expected"] == "1" and reply["got"] == "99"  # fmt: skip
    with pytest.raises(ConnectionClosed):
        raw.ws.recv(timeout=10)
    raw = Raw(_url(server), hello=False)
    reply = raw.ask({"type": "hello", "version": 1, "session": "0" * 32})
    assert reply["code"] == p.UNKNOWN_SESSION and reply["fatal"]
    raw.close()


def test_invalid_observations_name_each_violation_and_change_nothing(server, checkpoint: Path) -> None:
    rng = np.random.default_rng(5)
    good = _obs(TASKS[0], rng)
    cases = {
        "missing key": ({k: v for k, v in good.items() if k != "velocity"}, "obs.velocity", "present", "absent"),
        "extra key": ({**good, "torque": np.zeros(2, np.float32)}, "obs.torque", None, "present"),
        "shape": ({**good, "position": np.zeros(3, np.float32)}, "obs.position", "(2,)", "(3,)"),
        "dtype": ({**good, "pixels": good["pixels"].astype(np.float32)}, "obs.pixels", "uint8", "float32"),
        "nan": ({**good, "position": np.array([0.0, np.nan], np.float32)}, "obs.position", "finite values", "nan at index (1,)"),
        "inf": ({**good, "velocity": np.array([np.inf, 0.0], np.float32)}, "obs.velocity", "finite values", "inf at index (0,)"),
    }  # fmt: skip
    local = Policy.from_checkpoint(checkpoint)
    local.reset(TASKS[0])
    with PolicyClient(_url(server), task=TASKS[0]) as client:
        client.reset()
        for name, (obs, key, expected, got) in cases.items():
            with pytest.raises(ServerError) as caught:
                client.step(obs)
            error = caught.value
            assert error.code == p.INVALID_OBSERVATION and not error.fatal, name
            assert error.key == key and error.got == got, (name, error.key, error.got)
            assert expected is None or error.expected == expected, (name, error.expected)
            assert error.violations and error.violations[0]["key"] == key
        both = {**good, "position": np.zeros(3, np.float32), "velocity": np.array([np.nan, 0], np.float32)}
        with pytest.raises(ServerError) as caught:
            client.step(both)
        assert [v["key"] for v in caught.value.violations] == ["obs.position", "obs.velocity"]
        assert client.next_step == 0
        for t in range(3):  # still usable, and the errors left the history untouched
            obs = _obs(TASKS[0], np.random.default_rng(t))
            np.testing.assert_allclose(client.act(obs), local.act(obs), atol=1e-6)
    with PolicyClient(_url(server), task=TASKS[1]) as client:
        obs = _obs(TASKS[1], rng)
        with pytest.raises(ServerError) as caught:
            client.step({**obs, "direction": np.int64(9)})
        assert caught.value.code == p.INVALID_OBSERVATION and caught.value.key == "obs.direction"
        assert caught.value.expected == "integers in [0, 4)" and caught.value.got.startswith("9")
        with pytest.raises(ServerError) as caught:
            client.step({**obs, "mission": np.zeros(3, np.float32)})
        assert caught.value.key == "obs.mission"
        with pytest.raises(ServerError) as caught:
            client.reset(task="dmc-cartpole-swingup")
        assert caught.value.code == p.UNKNOWN_TASK and "babyai-GoToRedBall" in caught.value.expected
        client.reset(task=TASKS[1])
        assert client.act(obs).shape == (1,)


def test_gato_like_serve_reads_its_settings_flags(checkpoint: Path) -> None:
    """The command line builds EngineConfig and ServerConfig from their flags, nested ones included,
    and serves: a real `gato-like serve` process on a loopback port."""
    from gato_like.serving.loadgen import free_port, launch_server

    port = free_port()
    process = launch_server(checkpoint, port, max_batch=4, max_sessions=3, token="s3cret",
                            server_args=["--limits.max_keys", "12", "--hello_timeout_s", "5"])  # fmt: skip
    try:
        raw = Raw(f"ws://127.0.0.1:{port}", additional_headers={"Authorization": "Bearer s3cret"})
        limits = raw.welcome["limits"]
        assert limits["max_keys"] == 12 and limits["max_sessions"] == 3 and limits["max_batch"] == 4
        raw.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = subprocess.run([sys.executable, "-m", "gato_like.cli", "serve", "--ckpt", str(checkpoint), "--max_batch", "0"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "max_batch: expected a positive integer, got 0" in result.stderr


def test_bench_serve_reads_its_settings_flags(checkpoint: Path, tmp_path: Path) -> None:
    from gato_like.cli import main

    argv = ["bench", "serve", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--sessions", "1,2",
            "--duration", "0.5", "--unbatched", "false", "--threads", "1", "--task", TASKS[0]]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "serve_load.json").read_text())["results"]
    assert [(r["mode"], r["sessions"]) for r in rows] == [("batched", 1), ("batched", 2)]
    assert all(r["errors"] == {} and r["steps"] == r["scheduled"] > 0 for r in rows)


def test_bearer_token_is_checked_at_the_upgrade(checkpoint: Path) -> None:
    config = ServerConfig(port=0, token="s3cret-token")
    with background_server(load_checkpoint(checkpoint), EngineConfig(max_sessions=4), config) as server:
        url = _url(server)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            with pytest.raises(InvalidStatus) as caught:
                connect(url, additional_headers=headers, proxy=None, **_DIRECT).close()
            assert caught.value.response.status_code == 401
        with pytest.raises(ConnectionError, match="401"):
            PolicyClient(url, token="nope", task=TASKS[1]).act(_obs(TASKS[1], np.random.default_rng(0)))
        with PolicyClient(url, token="s3cret-token", task=TASKS[1]) as client:
            assert client.act(_obs(TASKS[1], np.random.default_rng(0))).shape == (1,)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert denied.value.code == 401
        denied.value.close()
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Authorization": "Bearer s3cret-token"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
        assert 'gato_serve_errors_total{code="UNAUTHORIZED"} 5.0' in text  # 4 upgrades and /metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
            assert response.status == 200


def test_health_readiness_and_metrics(server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
        assert response.status == 200
    with PolicyClient(_url(server), task=TASKS[0]) as client:
        client.act(_obs(TASKS[0], np.random.default_rng(0)))
        with pytest.raises(ServerError):
            client.act({})
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    for name in ("gato_serve_step_latency_seconds_bucket", "gato_serve_batch_size_bucket", "gato_serve_queue_wait_seconds_count", "gato_serve_batch_compute_seconds_sum", "gato_serve_sessions", "gato_serve_ready 1.0", 'gato_serve_errors_total{code="INVALID_OBSERVATION"}', "gato_serve_steps_total"):  # fmt: skip
        assert name in text, name


# -- engine limits -------------------------------------------------------------------------------


def test_overload_deadline_session_cap_and_idle_expiry(checkpoint: Path) -> None:
    async def scenario() -> None:
        config = EngineConfig(
            max_sessions=3, max_batch=4, queue_size=2, step_deadline_ms=50, idle_timeout_s=60
        )
        engine = Engine(load_checkpoint(checkpoint), config)
        await engine.start(warmup=False)
        try:
            sessions = [engine.open_session(object()) for _ in range(3)]
            with pytest.raises(ProtocolError) as full:
                engine.open_session(object())
            assert full.value.code == p.SESSION_LIMIT and full.value.fatal
            for s in sessions:
                await engine.reset(s, TASKS[0])
            obs = [_obs(TASKS[0], np.random.default_rng(i)) for i in range(3)]
            blocker = asyncio.ensure_future(engine._call(lambda: time.sleep(0.3)))  # the model is busy
            await asyncio.sleep(0.05)
            queued = [asyncio.ensure_future(engine.step(sessions[i], 0, obs[i])) for i in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(ProtocolError) as overloaded:
                await engine.step(sessions[2], 0, obs[2])
            assert overloaded.value.code == p.OVERLOADED and overloaded.value.retry_after_ms >= 1
            with pytest.raises(ProtocolError) as busy:
                await engine.step(sessions[0], 1, obs[0])
            assert busy.value.code == p.BUSY
            await blocker
            for future in queued:
                with pytest.raises(ProtocolError) as late:
                    await future
                assert late.value.code == p.DEADLINE_EXCEEDED and not late.value.fatal
            reply = await engine.step(sessions[0], 0, obs[0])  # not applied before: the same index works
            assert reply["step"] == 0 and sessions[0].next_step == 1
            blocker = asyncio.ensure_future(engine._call(lambda: time.sleep(0.02)))
            pair = [
                engine.step(s, s.next_step, o, deadline_ms=5000)
                for s, o in zip(sessions[1:], obs[1:], strict=True)
            ]
            replies = await asyncio.gather(*pair)
            await blocker
            assert [r["timing"]["batch_size"] for r in replies] == [2, 2]  # one forward pass for both
            expired = engine.expire_idle(time.monotonic() + 61)
            assert len(expired) == 3 and not engine.sessions
            await engine._call(lambda: None)  # the worker has freed the rows
            assert engine.pool.rows == []
            engine.open_session(object())  # room again
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_idle_session_is_expired_and_told(checkpoint: Path) -> None:
    with background_server(load_checkpoint(checkpoint), EngineConfig(idle_timeout_s=0.4), ServerConfig(port=0)) as server:  # fmt: skip
        raw = Raw(_url(server))
        time.sleep(1.5)
        reply = msgpack.unpackb(raw.ws.recv(timeout=5))
        assert reply["code"] == p.SESSION_EXPIRED and reply["fatal"]
        assert not server.engine.sessions


def test_client_reconnects_and_resumes_its_session(server, checkpoint: Path) -> None:
    local = Policy.from_checkpoint(checkpoint)
    local.reset(TASKS[1])
    observations = [_obs(TASKS[1], np.random.default_rng(t)) for t in range(4)]
    with PolicyClient(_url(server), task=TASKS[1]) as client:
        for t in range(2):
            np.testing.assert_array_equal(client.act(observations[t]), local.act(observations[t]))
        session = client.session
        client._conn.close()  # the network drops
        np.testing.assert_array_equal(client.act(observations[2]), local.act(observations[2]))
        assert client.session == session and client.welcome["resumed"] and client.welcome["next_step"] == 2
        # a second connection resuming the session takes it over; the first is told so
        thief = Raw(_url(server), hello=False)
        assert thief.ask({"type": "hello", "version": 1, "session": session})["resumed"]
        with pytest.raises(ServerError) as taken:  # no reconnect: the server closed it on purpose
            client.act(observations[3])
        assert taken.value.code == p.SESSION_EXPIRED and taken.value.fatal
        resent = thief.ask({"type": "step", "step": 2, "obs": p.encode_observation(observations[2])})
        assert resent["type"] == "action" and resent["step"] == 2
        thief.close()


# -- frame decoder -------------------------------------------------------------------------------

_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40)  # fmt: skip
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)  # fmt: skip
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "reset", "step", "ping", "bye", "nope"])},
    optional={"version": _values, "step": _values, "obs": _values, "id": _values, "task": _values, "prompt": _values, "goal": _values, "t": _values, "deadline_ms": _values},
)  # fmt: skip


def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        message = p.decode_frame(frame, SMALL)
    except ProtocolError as error:
        assert error.code in p.ERROR_CODES and error.message
        assert isinstance(p.encode_frame(error.to_message()), bytes)
    else:
        assert message.type in p.CLIENT_MESSAGES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_decoder_on_random_bytes(frame: bytes) -> None:
    _decode_or_protocol_error(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_fuzz_decoder_on_structured_messages(message: dict) -> None:
    _decode_or_protocol_error(msgpack.packb(message, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(p.DTYPES)),
    st.lists(st.integers(0, 4), max_size=4),
    st.data(),
)
def test_arrays_round_trip_and_mutations_are_caught(dtype: str, shape: list[int], data) -> None:
    raw = data.draw(st.binary(min_size=int(np.prod(shape)) * p.DTYPES[dtype].itemsize, max_size=int(np.prod(shape)) * p.DTYPES[dtype].itemsize))  # fmt: skip
    array = np.frombuffer(raw, dtype=p.DTYPES[dtype]).reshape(shape)
    frame = p.encode_frame({"type": "step", "step": 0, "obs": {"x": p.encode_array(array)}})
    decoded = p.decode_frame(frame).fields["obs"]["x"]
    assert (
        decoded.dtype == array.dtype and decoded.shape == array.shape and decoded.tobytes() == array.tobytes()
    )
    cut = data.draw(st.integers(0, len(frame) - 1))
    _decode_or_protocol_error(frame[:cut])
    flipped = bytearray(frame)
    flipped[data.draw(st.integers(0, len(frame) - 1))] ^= data.draw(st.integers(1, 255))
    _decode_or_protocol_error(bytes(flipped))


# -- light client and load generator -------------------------------------------------------------


def test_client_imports_and_acts_without_torch(server) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "import numpy as np\n"
        "from gato_like.serving.client import PolicyClient\n"
        "from gato_like.serving.protocol import example_observation\n"
        f"with PolicyClient({_url(server)!r}, task='babyai-GoToRedBall') as c:\n"
        "    a = c.act(example_observation(c.specs['babyai'], np.random.default_rng(0)))\n"
        "print(a.shape, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'safetensors')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(1,) ['torch']"  # only the blocked placeholder


def test_load_generator_reports_latency_from_the_schedule(server, tmp_path: Path) -> None:
    from gato_like.serving.loadgen import drive, plot

    row = asyncio.run(drive(_url(server), sessions=3, hz=20, duration=1.0, task=TASKS[1]))
    assert (
        row["sessions"] == 3 and row["scheduled"] == 60 and row["steps"] + sum(row["errors"].values()) == 60
    )
    lat = row["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert 0 < row["throughput_steps_per_s"] <= 3 * 20 * 1.2
    row["mode"] = "batched"
    path = plot({"hz": 20, "results": [row]}, tmp_path / "load.png")
    assert path.stat().st_size > 1000


def test_threads_of_sync_clients_share_the_server(server) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with PolicyClient(_url(server), task=TASKS[i % 2]) as client:
                for t in range(3):
                    client.act(_obs(TASKS[i % 2], np.random.default_rng(t)))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
