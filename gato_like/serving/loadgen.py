"""Load generator: N simulated robots acting at a fixed rate against a policy server.

Each robot is one :class:`AsyncPolicyClient` session that sends a step at ``start + phase + k / hz``
(phases spread uniformly over one period, as unsynchronised robots would be) and measures latency
from that *scheduled* send time, so a server that falls behind is charged for the wait before the
send as well (no coordinated omission). A step whose reply comes later than one period after its
scheduled time is a missed deadline; an error reply (OVERLOADED, DEADLINE_EXCEEDED, ...) counts as
missed too.

:func:`sweep` launches ``gato-like serve`` in a subprocess for each mode (``batched``: dynamic
batching; ``unbatched``: ``--max-batch 1``, one request per forward pass, the way openpi serves)
and drives it with N = 1, 4, 16, 32, 64 robots in turn, writing ``serve_load.json`` and
``serve_load.png``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gato_like.serving import protocol as p
from gato_like.serving.client import AsyncPolicyClient, ServerError

MODES = {"batched": None, "unbatched": 1}  # mode -> --max-batch (None: the server's default)


async def drive(
    url: str,
    sessions: int,
    hz: float = 20.0,
    duration: float = 10.0,
    task: str | None = None,
    token: str | None = None,
    seed: int = 0,
    before_clock: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``sessions`` robots for ``duration`` seconds at ``hz``; latency statistics in ms.
    ``before_clock`` is called once every robot is connected, reset and has acted once, just
    before the timed run starts (the soak starts its hostile clients there)."""
    period = 1.0 / hz
    clients = [AsyncPolicyClient(url, token, task=task, reconnect=False, retries=0, timeout=30.0, name=f"loadgen-{i}") for i in range(sessions)]  # fmt: skip
    await asyncio.gather(*(c.connect() for c in clients))
    specs = clients[0].specs
    name = clients[0].welcome.get("tasks", {}).get(task, task) if task else next(iter(specs))
    if name not in specs:
        raise KeyError(f"loadgen: the server knows no task or embodiment {task!r} (specs: {sorted(specs)})")
    rng = np.random.default_rng(seed)
    pool = [p.example_observation(specs[name], rng) for _ in range(16)]
    await asyncio.gather(*(c.reset(task=task) if task else c.reset(embodiment=name) for c in clients))
    for c in clients:  # one step each before the clock starts (first-step allocations)
        await c.step(pool[0])
    if before_clock is not None:
        before_clock()
    latencies: list[float] = []
    server_ms: list[float] = []
    batch_sizes: list[int] = []
    errors: Counter[str] = Counter()
    missed = 0
    start = time.perf_counter() + 0.05
    end = start + duration

    async def robot(i: int, client: AsyncPolicyClient) -> None:
        nonlocal missed
        phase = (i / sessions) * period
        k = 0
        while True:
            scheduled = start + phase + k * period
            if scheduled >= end:
                return
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                reply = await client.step(pool[(i + k) % len(pool)])
            except ServerError as error:
                errors[error.code] += 1
                missed += 1
                if error.fatal:
                    return
                # not applied: the client sends the same step index again next period
            except (TimeoutError, OSError, RuntimeError) as error:  # no reply in time, dropped connection
                errors[type(error).__name__] += 1
                missed += 1
                return  # the session's state is unknown: this robot stops, the run goes on
            else:
                latency = time.perf_counter() - scheduled
                latencies.append(latency * 1000)
                server_ms.append(float(reply["timing"]["total_ms"]))
                batch_sizes.append(int(reply["timing"]["batch_size"]))
                missed += latency > period
            k += 1
            # a robot that fell behind sends its next step at once; latency keeps counting from its schedule

    await asyncio.gather(*(robot(i, c) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    scheduled_total = len(latencies) + sum(errors.values())
    return {
        "sessions": sessions,
        "hz": hz,
        "duration_s": round(elapsed, 3),
        "steps": len(latencies),
        "scheduled": scheduled_total,
        "errors": dict(errors),
        "missed_deadlines": int(missed),
        "missed_fraction": round(missed / max(scheduled_total, 1), 4),
        "throughput_steps_per_s": round(len(latencies) / elapsed, 2),
        "latency_ms": {
            "p50": _round(np.percentile(lat, 50)),
            "p90": _round(np.percentile(lat, 90)),
            "p99": _round(np.percentile(lat, 99)),
            "max": _round(lat.max()),
            "mean": _round(lat.mean()),
        },
        "server_total_ms_p50": _round(np.median(server_ms)) if server_ms else None,
        "mean_batch_size": _round(np.mean(batch_sizes)) if batch_sizes else None,
    }


def raw_upgrade(port: int, receive_buffer: int | None = None, host: str = "127.0.0.1") -> socket.socket:
    """A WebSocket upgraded by hand on a plain blocking socket, nothing read past the handshake:
    a client that can misbehave below what a WebSocket library allows (never read, send garbage).
    ``receive_buffer`` shrinks the socket's receive buffer. Raises ``ConnectionRefusedError`` with
    the status line when the server refuses the upgrade."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: leave the first frames unread
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionRefusedError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return sock


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client WebSocket frame (binary by default; mask key 0, so the payload goes as is)."""
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 1 << 16:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + b"\x00\x00\x00\x00" + payload


def _round(value: Any) -> float | None:
    value = float(value)
    return round(value, 3) if np.isfinite(value) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_server(
    ckpt: str | Path,
    port: int,
    max_batch: int | None,
    max_sessions: int,
    token: str | None = None,
    server_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``gato-like serve`` in a subprocess (with ``server_args`` added, e.g. ``["--threads", "2"]``),
    returned once ``/readyz`` answers 200."""
    command = [sys.executable, "-m", "gato_like.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--max_sessions", str(max_sessions), "--log_level", "warning", *server_args]  # fmt: skip
    if max_batch is not None:
        command += ["--max_batch", str(max_batch)]
    env = dict(os.environ)
    if token:
        env["GATO_LIKE_TOKEN"] = token
    # stderr to a file, not a pipe: a pipe nobody drains fills (64 KB of logs) and blocks the server
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server process)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"the server exited with {process.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not become ready within 120 s")


@dataclass
class LoadConfig:
    """What a load test runs.

    The flags of ``gato-like bench serve`` besides ``--ckpt`` and ``--out``."""

    sessions: str | list[int] = "1,4,16,32,64"
    """Robot counts to sweep, comma-separated or a list."""
    hz: float = 20.0
    """Steps per second per robot."""
    duration: float = 10.0
    """Seconds per robot count."""
    task: str | None = None
    """Task (or embodiment) the robots act in (default: the first embodiment)."""
    unbatched: bool = True
    """Also measure the same model served one request at a time (--max_batch 1), as openpi serves."""
    url: str | None = None
    """A running server (ws://host:port) instead of launching one (one mode: as it is configured)."""
    token: str | None = None
    """Bearer token (default: $GATO_LIKE_TOKEN)."""
    threads: int | None = None
    """The launched servers' worker threads (default: theirs, from the cores)."""

    @property
    def counts(self) -> list[int]:
        if isinstance(self.sessions, str):
            return [int(n) for n in self.sessions.split(",") if n.strip()]
        return [int(n) for n in self.sessions]


def sweep(
    ckpt: str | Path | None,
    out: str | Path,
    config: LoadConfig | None = None,
    server_args: Sequence[str] = (),
    **fields: Any,
) -> dict[str, Any]:
    """The sweep, for each mode against a fresh server (or ``config.url``, one mode, as it is
    configured; ``server_args`` are added to each launched ``gato-like serve``, after
    ``--threads``). ``fields`` replace some of ``config``. Writes ``OUT/serve_load.json`` and
    ``OUT/serve_load.png``; returns the JSON."""
    c = replace(config or LoadConfig(), **fields)
    sessions, hz, duration, task, url = c.counts, c.hz, c.duration, c.task, c.url
    token = c.token or os.environ.get("GATO_LIKE_TOKEN") or None
    modes = ("batched", "unbatched") if c.unbatched else ("batched",)
    server_args = [*(["--threads", str(c.threads)] if c.threads else []), *server_args]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if url is None and ckpt is None:
        raise ValueError("bench serve: give --ckpt (servers are launched) or --url (a running server)")
    results: list[dict[str, Any]] = []
    for mode in modes if url is None else ("external",):
        process = None
        target = url
        if url is None:
            port = free_port()
            process = launch_server(ckpt, port, MODES[mode], max(sessions) + 4, token, server_args)  # type: ignore[arg-type]
            target = f"ws://127.0.0.1:{port}"
        try:
            for n in sessions:
                assert target is not None
                row = asyncio.run(drive(target, n, hz, duration, task, token))
                row["mode"] = mode
                results.append(row)
                lat = row["latency_ms"]
                print(
                    f"{mode:>9} N={n:<3} p50 {lat['p50']} ms  p99 {lat['p99']} ms  max {lat['max']} ms  "
                    f"missed {row['missed_deadlines']}/{row['scheduled']}  {row['throughput_steps_per_s']} steps/s  "
                    f"mean batch {row['mean_batch_size']}",
                    flush=True,
                )
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    report = {
        "checkpoint": str(ckpt) if ckpt else None,
        "url": url,
        "hz": hz,
        "duration_s": duration,
        "task": task,
        "server_args": list(server_args),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "serve_load.png")
    return report


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Latency percentiles and throughput against the number of robots, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    modes = sorted({r["mode"] for r in report["results"]})
    for mode in modes:
        rows = sorted((r for r in report["results"] if r["mode"] == mode), key=lambda r: r["sessions"])
        n = [r["sessions"] for r in rows]
        for q, style in (("p50", "--"), ("p99", "-")):
            ax.plot(n, [r["latency_ms"][q] or np.nan for r in rows], style, marker="o", label=f"{mode} {q}")
        bx.plot(n, [r["throughput_steps_per_s"] for r in rows], marker="o", label=mode)
    period_ms = 1000 / report["hz"]
    ax.axhline(period_ms, color="grey", lw=0.8, label=f"period ({period_ms:g} ms)")
    ax.set(xscale="log", yscale="log", xlabel="robots (sessions)", ylabel="latency from scheduled send (ms)")
    ax.set_title(f"latency at {report['hz']:g} Hz per robot")
    ax.legend(fontsize=7)
    n_all = sorted({r["sessions"] for r in report["results"]})
    bx.plot(n_all, [n * report["hz"] for n in n_all], ":", color="grey", label="offered load")
    bx.set(xscale="log", yscale="log", xlabel="robots (sessions)", ylabel="actions per second")
    bx.set_title("throughput")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
