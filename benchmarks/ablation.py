"""Closed-loop ablation of the model levers: each row trains the same preset on the same data for
the same budget and seed, then rolls the policy out in the simulators on unseen seeds.

    gato-like data generate --suite control --pixels false --episodes 20 --out data/control
    .venv/bin/python benchmarks/ablation.py --data data/control --preset debug --steps 500 \\
        --episodes 5 --rows all --out runs/ablation

Rows (``--rows`` a comma list, or ``all``):

- ``recipe``: every departure of the ``cpu`` recipe (2-step history, action tokens never inputs,
  ordinal value embedding, HL-Gauss targets, text weight 0.1, mean decoding);
- ``history-1``, ``history-4``, ``full-history``, ``no-action-masking``, ``no-value-embedding``,
  ``value-embedding-replace``, ``one-hot-targets``, ``argmax-decoding``, ``median-decoding``: one
  lever changed;
- ``gato``: every departure off (Gato's sequence and head as the paper has them).

Prints a table of expert-normalized score per task (and the final training policy loss, which is
not comparable across target types) and writes ``OUT/ablation.json``. Run alone: two trainings at
once on two cores measure nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from gato_like.training.recipes import ACTING

ROWS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "history-1": {"history_steps": 1},
    "history-4": {"history_steps": 4},
    "full-history": {"history_steps": 0},
    "no-action-masking": {"action_input_dropout": 0.0},
    "no-value-embedding": {"value_embedding": "off"},
    "value-embedding-replace": {"value_embedding": "replace"},
    "one-hot-targets": {"target_sigma_bins": 0.0},
    "argmax-decoding": {"action_decoding": "argmax"},
    "median-decoding": {"action_decoding": "median"},
    "gato": {
        "value_embedding": "off",
        "target_sigma_bins": 0.0,
        "action_decoding": "argmax",
        "text_weight": 1.0,
        "history_steps": 0,
        "action_input_dropout": 0.0,
    },
}
"""Each row: the ``cpu`` recipe's departures (``recipes.ACTING`` and the model defaults) with one changed."""


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import csv

    from gato_like.training.evaluate import evaluate
    from gato_like.training.train import train

    out = Path(args.out) / name
    started = time.perf_counter()
    checkpoint = train(
        args.data, out, preset=args.preset, max_steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=max(1, args.steps // 10), val_every=args.steps, seed=args.seed,
        progress=False, model=ACTING | ROWS[name], workers=args.workers, rollout_episodes=0,
        batch_tokens=args.batch_tokens,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    summary = evaluate(checkpoint, out / "eval", episodes=args.episodes, seed=args.seed,
                       write_card_file=False, media=False)  # fmt: skip
    with open(out / "logs" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["train/policy_loss"]) for r in rows if r.get("train/policy_loss")]
    return {
        "row": name,
        "overrides": ROWS[name],
        "train_seconds": round(train_seconds, 1),
        "final_policy_loss": round(sum(losses[-5:]) / max(len(losses[-5:]), 1), 4) if losses else None,
        "scores": {t: r["expert_normalized_score"] for t, r in summary["tasks"].items()},
        "mean_score": summary["mean_score"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="all")
    args = parser.parse_args()
    names = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    results = []
    for name in names:
        results.append(run_row(name, args))
        r = results[-1]
        print(f"{name:20s} mean {r['mean_score']}  {r['scores']}  ({r['train_seconds']} s)", flush=True)
    tasks = sorted({t for r in results for t in r["scores"]})
    print("\n| row | " + " | ".join(tasks) + " | mean |\n|---|" + "---|" * (len(tasks) + 1))
    for r in results:
        cells = [f"{r['scores'].get(t, float('nan')):.2f}" for t in tasks]
        print(f"| {r['row']} | " + " | ".join(cells) + f" | **{r['mean_score']:.2f}** |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(
        json.dumps({"args": vars(args), "rows": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
