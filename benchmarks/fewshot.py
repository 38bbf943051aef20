"""Few-shot adaptation to the held-out embodiment: score after fine-tuning on N demos, pretrained
vs the same architecture trained from scratch on the same demos, over seeds.

    gato-like data generate --suite heldout --pixels false --episodes 60 --max_steps 250 --out data/arm3
    .venv/bin/python benchmarks/fewshot.py --base runs/base/checkpoint --heldout data/arm3 \\
        --demos 5,10,25,50 --seeds 0,1,2 --out runs/fewshot

For every (demos N, seed): N expert episodes of ``arm3-reach`` drawn from ``--heldout`` by the seed
are saved as plain ``.npz`` files and brought in with ``gato-like data convert`` (the user's path),
then ``gato-like finetune`` adapts ``--base`` (``--mode``, default lora) and, separately, a randomly
initialized model of the same config (``full``: every weight from scratch); ``mlp`` fits the plain
behaviour-cloning reference of ``benchmarks/mlp_reference.py`` on the same demos. Both are rolled out by
``gato-like eval`` on episode seeds no demo used, prompted with a demo, and scored with the
``--heldout`` dataset's normalizers (expert and uniform-random returns at the same episode length):
``(R - R_random) / (R_expert - R_random)``.

Writes ``OUT/fewshot.json`` (every run), ``OUT/fewshot.md`` (the table) and ``OUT/fewshot.png``;
runs go two at a time (one torch thread each) by default.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

TASK = "arm3-reach"


def _demos_folder(heldout: Path, count: int, seed: int, out: Path) -> Path:
    """``count`` demos of the held-out dataset, chosen by ``seed``, through `data convert`."""
    from gato_like.data_pipelines.convert import convert_npz
    from gato_like.data_pipelines.shards import iter_task

    episodes = list(iter_task(heldout, TASK))
    if count > len(episodes):
        raise SystemExit(f"--heldout {heldout} has {len(episodes)} episodes of {TASK}; {count} asked for")
    chosen = random.Random(seed).sample(range(len(episodes)), count)
    npz = out / "npz"
    shutil.rmtree(npz, ignore_errors=True)
    npz.mkdir(parents=True)
    for i in chosen:
        e = episodes[i]
        arrays = {f"obs.{k}": v for k, v in e.observations.items()}
        np.savez(
            npz / f"demo_{i:04d}.npz",
            **arrays,
            actions=e.actions,
            rewards=e.rewards,
            success=np.bool_(e.success),
        )
    demos = out / "demos"
    convert_npz(npz, heldout / TASK / "embodiment.json", demos, task=TASK, overwrite=True)
    return demos


def _scratch_checkpoint(base: Path, out: Path, seed: int) -> Path:
    """A randomly initialized model with the base's config, tokenizer and specs."""
    import torch

    from gato_like.checkpoint import load_checkpoint, save_checkpoint
    from gato_like.model import GatoModel

    loaded = load_checkpoint(base)
    torch.manual_seed(seed)
    model = GatoModel(loaded.model.config)
    meta = {"preset": loaded.model.config.name, "step": 0, "data": None, "tokens": 0}
    meta["tokenizer_sha256"] = loaded.meta.get("tokenizer_sha256")
    return save_checkpoint(out, model, loaded.text, loaded.specs, loaded.tasks, meta)


def _mlp_cell(job: dict[str, Any], demos: Path, normalizers: dict[str, Any]) -> dict[str, Any]:
    """The plain reference on the same demos: benchmarks/mlp_reference.py's per-task MLP, trained
    for ``--mlp_seconds`` and rolled out on the same evaluation seeds as the transformer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from mlp_reference import fit

    from gato_like.envs.registry import get_task
    from gato_like.training.evaluate import eval_seed, normalized_score

    started = time.perf_counter()
    _, _, actor, steps = fit(TASK, str(demos), job["mlp_seconds"], job["seed"])
    task = get_task(TASK)
    returns = [
        task.rollout(eval_seed(TASK, job["seed"], i), actor, render=False, max_steps=job["max_steps_episode"]).episode_return
        for i in range(job["episodes"])
    ]  # fmt: skip
    mean = float(np.mean(returns))
    score = normalized_score(mean, normalizers["expert"], normalizers["random"])
    return {
        **{k: job[k] for k in ("init", "demos", "seed")},
        "mode": "mlp",
        "mean_return": round(mean, 2),
        "score": None if score is None else round(score, 4),
        "success_rate": float(np.mean([r > 0 for r in returns])),
        "held_out_policy_loss": None,
        "steps": steps,
        "train_seconds": job["mlp_seconds"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (init, demos, seed) cell: convert, fine-tune (or fit the MLP reference), evaluate."""
    import torch

    torch.set_num_threads(job["threads"])
    from gato_like.data_pipelines.shards import read_index
    from gato_like.training.evaluate import evaluate
    from gato_like.training.finetune import FinetuneConfig, finetune

    out = Path(job["out"])
    heldout = Path(job["heldout"])
    demos = _demos_folder(heldout, job["demos"], job["seed"], out)
    if job["init"] == "mlp":
        return _mlp_cell(job, demos, read_index(heldout)["tasks"][TASK]["returns"])
    base = Path(job["base"])
    if job["init"] == "scratch":
        base = _scratch_checkpoint(base, out / "scratch-init", job["seed"])
    mode = job["mode"] if job["init"] == "pretrained" else "full"
    started = time.perf_counter()
    config = FinetuneConfig(
        mode=mode, seed=job["seed"], max_steps=job["max_steps"], val_every=job["val_every"], lr=job["lr"]
    )
    checkpoint = finetune(base, demos, out / "run", config, task=TASK, progress=False)
    train_seconds = time.perf_counter() - started
    summary = evaluate(
        checkpoint, out / "eval", tasks=[TASK], episodes=job["episodes"], max_steps=job["max_steps_episode"], seed=job["seed"],
        prompt=demos if job["prompt"] else None, write_card_file=False, media=False,
    )  # fmt: skip
    normalizers = read_index(heldout)["tasks"][TASK]["returns"]
    expert, rand = normalizers["expert"]["mean"], normalizers["random"]["mean"]
    result = summary["tasks"][TASK]
    info = json.loads((out / "run" / "finetune.json").read_text())
    return {
        **{k: job[k] for k in ("init", "demos", "seed")},
        "mode": mode,
        "mean_return": result["mean_return"],
        "score": round((result["mean_return"] - rand) / (expert - rand), 4),
        "success_rate": result["success_rate"],
        "held_out_policy_loss": info.get("best_held_out_policy_loss"),
        "steps": info["steps_run"],
        "best_step": info["best_step"],
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(results: list[dict[str, Any]], counts: list[int]) -> str:
    lines = [
        "| demos | pretrained: score (mean ± std) | success | held-out loss | scratch: score (mean ± std) | success | held-out loss | MLP reference: score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        cells = [str(n)]
        for init in ("pretrained", "scratch", "mlp"):
            rows = [r for r in results if r["demos"] == n and r["init"] == init]
            width = 1 if init == "mlp" else 3
            if not rows:
                cells += ["-"] * width
                continue
            scores = np.array([r["score"] for r in rows])
            cells.append(f"{scores.mean():.2f} ± {scores.std():.2f} ({len(rows)} seeds)")
            if init != "mlp":
                cells += [
                    f"{np.mean([r['success_rate'] for r in rows]):.0%}",
                    f"{np.mean([r['held_out_policy_loss'] for r in rows]):.3f}",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], counts: list[int], path: Path) -> None:
    """Score (left) and held-out policy loss (right) against the number of demos, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, axis, label in (("score", axes[0], "expert-normalized score"), ("held_out_policy_loss", axes[1], "held-out policy loss (nats/token)")):  # fmt: skip
        for init, color in (("pretrained", "#4c72b0"), ("scratch", "#dd8452"), ("mlp", "#55a868")):
            xs, means, stds = [], [], []
            for n in counts:
                values = [
                    r[key] for r in results if r["demos"] == n and r["init"] == init and r[key] is not None
                ]
                if values:
                    xs.append(n)
                    means.append(float(np.mean(values)))
                    stds.append(float(np.std(values)))
            if xs:
                axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=init, color=color)
        if key == "score":
            axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="expert")
            axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xticks(counts, [str(n) for n in counts])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("demonstrations")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{TASK}: few-shot adaptation", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="pretrained checkpoint directory")
    parser.add_argument(
        "--heldout", type=Path, required=True, help="dataset with arm3-reach episodes and normalizers"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/fewshot"))
    parser.add_argument("--demos", default="5,10,25,50")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--inits",
        default="pretrained,scratch,mlp",
        help="pretrained, scratch and/or mlp (the plain reference)",
    )
    parser.add_argument("--mlp_seconds", type=float, default=20.0, help="training time of the MLP reference")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning peak lr (default: finetune's)")
    parser.add_argument("--mode", default="lora", help="fine-tuning mode of the pretrained model")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per run")
    parser.add_argument(
        "--max_steps_episode",
        type=int,
        default=250,
        help="evaluation episode length (the normalizers' length)",
    )
    parser.add_argument(
        "--max_steps", type=int, default=None, help="fine-tuning steps at most (default: finetune's)"
    )
    parser.add_argument("--val_every", type=int, default=None)
    parser.add_argument(
        "--prompt", type=int, default=1, help="prompt evaluation episodes with a demo (1) or not (0)"
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each one torch thread)")
    args = parser.parse_args()
    counts = [int(n) for n in args.demos.split(",")]
    jobs = [
        {
            "init": init, "demos": n, "seed": seed, "base": str(args.base), "heldout": str(args.heldout),
            "out": str(args.out / f"{init}-{n}-seed{seed}"), "mode": args.mode, "episodes": args.episodes,
            "max_steps_episode": args.max_steps_episode, "max_steps": args.max_steps, "val_every": args.val_every,
            "prompt": bool(args.prompt), "threads": max(1, (os.cpu_count() or 2) // args.parallel),
            "mlp_seconds": args.mlp_seconds, "lr": args.lr,
        }
        for n in counts
        for seed in (int(s) for s in args.seeds.split(","))
        for init in args.inits.split(",")
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "fewshot.json"
    done = json.loads(results_file.read_text())["runs"] if results_file.is_file() else []
    finished = {(r["init"], r["demos"], r["seed"]) for r in done}
    todo = [j for j in jobs if (j["init"], j["demos"], j["seed"]) not in finished]
    print(f"{len(todo)} runs to go ({len(done)} already in {results_file})", flush=True)
    with ProcessPoolExecutor(args.parallel) as pool:
        for result in pool.map(run_one, todo):
            done.append(result)
            print(json.dumps(result), flush=True)
            results_file.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": done}, indent=2)
                + "\n"
            )
    text = table(done, counts)
    (args.out / "fewshot.md").write_text(text + "\n")
    plot(done, counts, args.out / "fewshot.png")
    print(text)


if __name__ == "__main__":
    main()
