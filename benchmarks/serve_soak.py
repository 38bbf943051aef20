"""Soak test: well-behaved robots beside hostile clients, on a loopback server (bounded: minutes).

    .venv/bin/python benchmarks/serve_soak.py [--ckpt CKPT] [--robots 8] [--hz 20] [--seconds 20]
        [--out runs/serve_soak]

A ``gato-like serve`` subprocess (short hostile-client limits: grace 2 s, hello timeout 2 s, send
timeout 2 s) is driven in three phases:

1. **quiet**: ``--robots`` well-behaved robots at ``--hz`` for ``--seconds`` (latency from each
   step's scheduled send, as ``gato-like bench serve``); then the server's resident memory (RSS).
2. **hostile**: the same robots again, while another process runs, all at once:
   - *never-read* clients: hello, reset, then a flood of invalid steps whose error replies they
     never read (each reply ~15x its request);
   - a *connect-drop storm*: connect, hello, drop without bye, as fast as the server lets it;
   - *garbage*: random bytes, and msgpack that is not a message, in binary and text frames;
   - *silent* connections that upgrade and never say hello.
3. **after**: the hostile process is stopped; once the server's timeouts have passed, its RSS
   and live sessions again, and a last quiet run.

It reports the robots' p50/p99 in each phase (pass: hostile p99 <= 2x quiet p99), their missed
deadlines, the server's RSS at each point (pass: back within 10 % or 64 MB of the quiet baseline
after the hostile phase) and what the hostile clients got. Without ``--ckpt`` an untrained
``tiny`` model with the CPU recipes' acting settings on cartpole's proprioception is served (the
time does not depend on the weights). Results go to ``OUT/serve_soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
from prometheus_client.parser import text_string_to_metric_families

from gato_like.serving import protocol as p
from gato_like.serving.loadgen import client_frame, drive, free_port, launch_server, raw_upgrade

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acting_speed import save_untrained

SERVER_LIMITS = ["--detached_grace_s", "2", "--hello_timeout_s", "2", "--send_timeout_s", "2"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metrics(port: int) -> dict[str, float]:
    """The server's Prometheus samples by name, labels folded in (``name{label="value"}``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


# -- hostile clients (a separate process, plain sockets) --------------------------------------------


def _hostile(port: int, seconds: float, counts: Any, kinds: tuple[str, ...] = ("never_read", "storm", "garbage", "silent")) -> None:  # fmt: skip
    """Run every kind of hostile client until ``seconds`` have passed; tally into ``counts``."""
    import random
    import threading

    end = time.monotonic() + seconds
    hello = client_frame(p.encode_frame({"type": "hello", "version": p.PROTOCOL_VERSION}))
    bad_step = client_frame(
        p.encode_frame({"type": "step", "step": 0, "obs": {f"k{i}": "" for i in range(256)}})
    )

    lock = threading.Lock()

    def count(name: str) -> None:
        with lock, contextlib.suppress(OSError):  # the tally's manager is gone at shutdown
            counts[name] = counts.get(name, 0) + 1

    def never_read() -> None:
        while time.monotonic() < end:
            try:
                sock = raw_upgrade(port, receive_buffer=4096)
                sock.sendall(hello + client_frame(p.encode_frame({"type": "reset"})))
                sock.settimeout(1.0)
                while time.monotonic() < end:
                    sock.sendall(bad_step)  # blocks once the server stops reading us
                    count("never_read_frames")
            except OSError:
                count("never_read_closed")
            time.sleep(0.2)

    def storm() -> None:
        while time.monotonic() < end:
            try:
                sock = raw_upgrade(port)
                sock.sendall(hello)
                sock.recv(4096)  # the welcome (a session opened)
                sock.close()  # dropped without bye
                count("storm_cycles")
            except OSError:
                count("storm_refused")
                time.sleep(0.05)

    def garbage() -> None:
        rng = random.Random(0)
        while time.monotonic() < end:
            try:
                sock = raw_upgrade(port)
                for _ in range(50):
                    choice = rng.random()
                    if choice < 0.4:
                        payload = rng.randbytes(rng.randint(1, 2000))
                    elif choice < 0.8:
                        payload = msgpack.packb(
                            {"type": rng.choice(["step", "reset", "nope", 3]), "x": [1] * 50}
                        )
                    else:
                        sock.sendall(client_frame(b"not a frame we speak", opcode=0x1))
                        continue
                    sock.sendall(client_frame(payload))
                    sock.recv(65536)
                    count("garbage_frames")
                    time.sleep(0.01)
                sock.close()
            except OSError:
                count("garbage_closed")
                time.sleep(0.05)

    def silent() -> None:
        held: list[socket.socket] = []
        while time.monotonic() < end:
            try:
                held.append(raw_upgrade(port))
                count("silent_opened")
            except OSError:
                count("silent_refused")
                time.sleep(0.2)
            time.sleep(0.02)
        for sock in held:
            sock.close()

    chosen = {
        "never_read": [never_read, never_read],
        "storm": [storm],
        "garbage": [garbage],
        "silent": [silent],
    }
    workers = [threading.Thread(target=f, daemon=True) for kind in kinds for f in chosen[kind]]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 10)


# -- the soak ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--robots", type=int, default=8)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", default="runs/serve_soak")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = Path(args.ckpt) if args.ckpt else save_untrained(Path(scratch), pixels=False)
        port = free_port()
        server = launch_server(ckpt, port, None, args.robots + 200, None, SERVER_LIMITS)
        url = f"ws://127.0.0.1:{port}"
        report: dict[str, Any] = {"robots": args.robots, "hz": args.hz, "seconds": args.seconds,
                                  "server_args": SERVER_LIMITS, "cpu_count": os.cpu_count()}  # fmt: skip
        try:
            report["rss_mb_ready"] = round(rss_mb(server.pid), 1)
            quiet = asyncio.run(drive(url, args.robots, args.hz, args.seconds))
            time.sleep(3)  # the robots' sessions leave (bye)
            report["quiet"] = quiet
            report["rss_mb_quiet"] = round(rss_mb(server.pid), 1)
            with multiprocessing.Manager() as manager:
                counts = manager.dict()
                hostile = multiprocessing.Process(target=_hostile, args=(port, args.seconds + 4, counts))

                def unleash() -> None:  # the robots are connected: the hostile clients start first
                    hostile.start()
                    time.sleep(2)

                peak = [rss_mb(server.pid)]
                report["hostile"] = asyncio.run(
                    drive(url, args.robots, args.hz, args.seconds, before_clock=unleash)
                )
                peak.append(rss_mb(server.pid))
                hostile.join(args.seconds + 30)
                if hostile.is_alive():
                    hostile.kill()
                report["hostile_clients"] = dict(counts)
                if hostile.exitcode != 0 or not counts:  # a soak without its hostile clients proves nothing
                    raise RuntimeError(
                        f"the hostile clients' process failed (exit code {hostile.exitcode}, tally {dict(counts)})"
                    )
            report["rss_mb_hostile_end"] = round(max(peak), 1)
            time.sleep(8)  # grace (2 s), hello and send timeouts (2 s) and the reaper's period
            report["rss_mb_after"] = round(rss_mb(server.pid), 1)
            gauges = metrics(port)
            report["after_metrics"] = {k: v for k, v in gauges.items() if k.startswith(("gato_serve_sessions", "gato_serve_connections", "gato_serve_errors"))}  # fmt: skip
            report["after"] = asyncio.run(drive(url, args.robots, args.hz, args.seconds / 2))
        finally:
            server.terminate()
            server.wait(10)
    q, h, a = (report[k]["latency_ms"] for k in ("quiet", "hostile", "after"))
    ratio = h["p99"] / q["p99"] if q["p99"] else float("inf")
    grown = report["rss_mb_after"] - report["rss_mb_quiet"]
    report["pass"] = {
        "hostile_p99_within_2x_quiet": ratio <= 2.0,
        "rss_back_to_baseline": grown <= max(64.0, 0.10 * report["rss_mb_quiet"]),
    }
    (out / "serve_soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.robots} robots at {args.hz:g} Hz, {args.seconds:g} s per phase; {os.cpu_count()} cores")
    for name, lat in (("quiet", q), ("hostile", h), ("after", a)):
        row = report[name]
        print(f"  {name:8} p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms  missed {row['missed_deadlines']}/{row['scheduled']}  errors {row['errors']}")  # fmt: skip
    print(f"  hostile p99 / quiet p99 = {ratio:.2f} (pass <= 2)")
    print(f"  server RSS MB: ready {report['rss_mb_ready']}, quiet {report['rss_mb_quiet']}, "
          f"hostile peak {report['rss_mb_hostile_end']}, after {report['rss_mb_after']} (grew {grown:+.1f})")  # fmt: skip
    print(f"  hostile clients: {report['hostile_clients']}")
    print(f"  after: {report['after_metrics']}")
    print(f"results: {out / 'serve_soak.json'}")


if __name__ == "__main__":
    main()
