"""Probe P1: how many minutes of 2-core training each timestep representation needs on pendulum
swing-up alone (held-push data), scored in closed loop, beside a plain MLP on the same data.

    .venv/bin/python benchmarks/probe_pendulum.py --out runs/probe_p1 --minutes 2,5 \\
        --backbones decoder,pooled,perceiver --episodes 10 --runs 3
    .venv/bin/python benchmarks/probe_pendulum.py --out runs/probe_p1_steps --steps 1000 --hold 10,50

For every backbone, every data hold in ``--hold`` and every budget in ``--minutes`` (or in
``--steps``: a fixed number of optimizer steps, so runs on machines of different speeds and runs
beside each other compare) it runs, ``--runs`` times with seeds from ``--seed``, the real commands
a user runs (one run of 2 minutes is a coin toss on this task: the same command gave 0.76 and 0.33,
docs/results.md): ``gato-like train`` (the ``cpu-demo`` recipe, ``debug`` preset,
``--model.backbone B``, the learning rate annealed over that budget, no validation rollouts, no
goal passes) then ``gato-like eval`` on ``--episodes`` unseen full-length episodes. The MLP
reference (benchmarks/mlp_reference.py) trains for ``--mlp_seconds`` on the same episodes. The data
is made once per hold with ``gato-like data generate --tasks dmc-pendulum-swingup --pixels false
--episodes 60 --hold H`` unless ``--data`` names a dataset: H = 50 leaves 2 % of the timesteps
within 18 degrees of upright, H = 10 (what the suite's command now uses for pendulum) 12 %.
Prints the table and writes ``OUT/probe_p1.json``. Run alone: two trainings at once on two cores
measure nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASK = "dmc-pendulum-swingup"


def cli() -> list[str]:
    return [str(Path(sys.executable).parent / "gato-like")]


def run(args: list[str], log: Path) -> None:
    """Run a ``gato-like`` command, its output to ``log``; raise with the log's tail on failure."""
    with log.open("w") as out:
        code = subprocess.call([*cli(), *args], stdout=out, stderr=subprocess.STDOUT)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(args[:2])} failed ({code}); {log}:\n{tail}")


def ensure_data(out: Path, data: Path | None, hold: int) -> Path:
    if data is not None:
        return data
    data = out / ("data" if hold == 50 else f"data-hold{hold}")  # hold 50: the folder earlier runs made
    if not (data / "index.json").exists():
        run(["data", "generate", "--tasks", TASK, "--pixels", "false", "--episodes", "60",
             "--hold", str(hold), "--out", str(data)], out / f"generate-hold{hold}.log")  # fmt: skip
    return data


def train_and_score(data: Path, out: Path, backbone: str, budget: tuple[str, float], episodes: int, seed: int, tag: str = "") -> dict[str, Any]:  # fmt: skip
    """One ``train`` + ``eval``; ``budget`` is ``("minutes", m)`` or ``("steps", n)``."""
    kind, amount = budget
    unit = "min" if kind == "minutes" else "steps"
    run_dir = out / f"{backbone}{tag}-{amount:g}{unit}-seed{seed}"
    limits = (["--max_steps", "1000000", "--max_minutes", str(amount)] if kind == "minutes"
              else ["--max_steps", str(int(amount)), "--max_minutes", "600"])  # fmt: skip
    run(["train", "--data", str(data), "--out", str(run_dir), "--recipe", "cpu-demo",
         "--model.backbone", backbone, *limits,
         "--val_every", "1000000", "--rollout_episodes", "0", "--goal_every", "0",
         "--batch_size", "1024", "--seed", str(seed)], out / f"{run_dir.name}.train.log")  # fmt: skip
    run(["eval", "--ckpt", str(run_dir / "checkpoint"), "--out", str(run_dir / "eval"),
         "--episodes", str(episodes)], out / f"{run_dir.name}.eval.log")  # fmt: skip
    score = json.loads((run_dir / "eval" / "eval.json").read_text())["tasks"][TASK]
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    return {
        "backbone": backbone,
        "minutes": round(meta.get("training_seconds", 0.0) / 60, 2) if kind == "steps" else amount,
        "budget": f"{amount:g} {kind}",
        "steps": meta["step"],
        "tokens": meta["tokens"],
        "score": score["expert_normalized_score"],
        "success_rate": score["success_rate"],
        "returns": score["returns"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/probe_p1"))
    parser.add_argument(
        "--data", type=Path, default=None, help="a pendulum dataset (default: made once per --hold)"
    )
    parser.add_argument(
        "--hold", default="10", help="comma list: the held pushes' longest hold in the data made"
    )
    parser.add_argument(
        "--minutes", default="2", help="comma list of training budgets (ignored with --steps)"
    )
    parser.add_argument("--steps", default="", help="comma list of fixed step budgets instead of minutes")
    parser.add_argument("--backbones", default="decoder,pooled,perceiver")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--mlp_seconds", type=float, default=60.0, help="0: no MLP row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per cell (seeds seed..seed+runs-1): one 2-minute run is a coin toss",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    holds = [int(h) for h in args.hold.split(",")] if args.data is None else [0]
    budgets = (
        [("steps", float(n)) for n in args.steps.split(",")]
        if args.steps
        else [("minutes", float(m)) for m in args.minutes.split(",")]
    )
    rows = []
    for hold in holds:
        data = ensure_data(args.out, args.data, hold)
        tag = f"-hold{hold}" if len(holds) > 1 else ""
        for budget in budgets:
            for backbone in args.backbones.split(","):
                for seed in range(args.seed, args.seed + args.runs):
                    started = time.perf_counter()
                    row = train_and_score(data, args.out, backbone, budget, args.episodes, seed, tag)
                    rows.append(row | {"seed": seed, "hold": hold})
                    print(f"{backbone:10s} hold {hold:3d}  {row['budget']:>12s}  seed {seed}  {row['steps']:6d} steps "
                          f"{row['minutes']:5.1f} min  score {row['score']:.2f}  success {row['success_rate']:.1f}  "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    mlps: dict[int, Any] = {}
    if args.mlp_seconds > 0:
        sys.path.insert(0, str(Path(__file__).parent))
        import mlp_reference

        for hold in holds:
            out = args.out / (f"mlp-hold{hold}" if len(holds) > 1 else "mlp")
            subprocess.check_call([sys.executable, mlp_reference.__file__, "--data", str(ensure_data(args.out, args.data, hold)),
                                   "--seconds", str(args.mlp_seconds), "--episodes", str(args.episodes), "--out",
                                   str(out), "--seed", str(args.seed)])  # fmt: skip
            mlps[hold] = json.loads((out / "mlp_reference.json").read_text())["tasks"][TASK]
    print(
        f"\nP1, {TASK} alone, {args.episodes} unseen episodes, expert-normalized (target: 0.68 within 2 min)"
    )
    print(
        "| representation | data hold | budget | runs | steps (mean) | minutes (mean) | score: mean (each run) | success (mean) |\n|---|---|---|---|---|---|---|---|"
    )
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["backbone"], r["hold"], r["budget"]), []).append(r)
    for (backbone, hold, budget), runs in cells.items():
        each = ", ".join(f"{r['score']:.2f}" for r in runs)
        mean = sum(r["score"] for r in runs) / len(runs)
        steps = sum(r["steps"] for r in runs) / len(runs)
        minutes = sum(r["minutes"] for r in runs) / len(runs)
        success = sum(r["success_rate"] for r in runs) / len(runs)
        print(
            f"| {backbone} | {hold or 'given'} | {budget} | {len(runs)} | {steps:.0f} | {minutes:.1f} | {mean:.2f} ({each}) | {success:.2f} |"
        )
    for hold, mlp in mlps.items():
        print(
            f"| MLP 2x256 (reference) | {hold or 'given'} | {args.mlp_seconds:g} s | 1 | {mlp['train_steps']} | {args.mlp_seconds / 60:.1f} | {mlp['score']:.2f} | |"
        )
    (args.out / "probe_p1.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "mlp": mlps}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
