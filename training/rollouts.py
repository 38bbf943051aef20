"""Closed-loop scores during training: at every validation, the policy is rolled out in the real
simulators for a few episodes per task on unseen seeds, and the expert-normalized score per task
is logged beside the losses (``rollout/<task>/score``, ``rollout/mean_score``). The weights with
the best mean score are exported to ``OUT/best`` (the checkpoint format), so the run's best
policy, not its last, is what a user evaluates and serves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from gato_like.checkpoint import Checkpoint, save_checkpoint
from gato_like.data_pipelines.shards import atomic_write_bytes
from gato_like.envs.registry import TASKS
from gato_like.tokenizers import TextTokenizer
from gato_like.training.averaging import exported_model

#: Tasks that have data but no simulator to roll out in (they are never scored).
UNSCORED = ("captions",)


def rollout_tasks(tasks: dict[str, dict[str, Any]], requested: list[str] | None = None) -> list[str]:
    """The tasks to roll out: ``requested`` (each must have a simulator and normalizers), or every
    task of the dataset that has both."""
    if requested:
        problems = []
        for name in requested:
            if name not in tasks:
                problems.append(f"{name!r} is not a task of the dataset (tasks: {sorted(tasks)})")
            elif name in UNSCORED or name not in TASKS:
                problems.append(f"{name!r} has no simulator to roll out in")
            elif not (tasks[name].get("returns") or {}).get("expert"):
                problems.append(f"{name!r} has no expert return to normalize by")
        if problems:
            raise ValueError("rollout tasks: " + "; ".join(problems))
        return list(requested)
    return [
        n
        for n in sorted(tasks)
        if n in TASKS and n not in UNSCORED and (tasks[n].get("returns") or {}).get("expert")
    ]


class RolloutScores(L.Callback):
    """Rolls the policy out after every validation (rank 0) and keeps the best weights by score.

    Args:
        out: run directory; the best weights go to ``out/best``, the history to ``out/rollouts.json``.
        tasks: task name -> ``{"embodiment", "returns", "max_steps"}`` (the dataset's index entries).
        specs: embodiment name -> spec.
        episodes: episodes per task at each validation.
        max_steps: episode length per task (default: the data's, so the normalizers apply).
        seed: evaluation seed (episodes use seeds no data generation draws).
        meta: ``meta.json`` content of the exported best checkpoint (updated with the scores).
        end_gap: at the end of training, score again only if at least this many steps passed since
            the last score (a clock that stops a step after a validation would repeat its rollouts).
    """

    def __init__(
        self,
        out: Path,
        tasks: dict[str, dict[str, Any]],
        specs: dict[str, Any],
        names: list[str],
        episodes: int = 2,
        seed: int = 0,
        meta: Callable[[L.Trainer, L.LightningModule], dict[str, Any]] | None = None,
        end_gap: int = 1,
    ) -> None:
        self.out, self.tasks, self.specs, self.names = Path(out), tasks, specs, names
        self.episodes, self.seed, self.end_gap = episodes, seed, max(1, int(end_gap))
        self.meta: Callable[[L.Trainer, L.LightningModule], dict[str, Any]] = meta or (
            lambda trainer, module: {}
        )
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.chosen: dict[str, Any] | None = None
        """Which weights ``out/best`` holds at the end, and why (:meth:`choose`)."""

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        # a score taken after the last trainer state (the end of a time-capped run) is in best/
        saved = self.out / "best" / "meta.json"
        if saved.is_file():
            score = (json.loads(saved.read_text()).get("rollout") or {}).get("mean_score")
            if score is not None and (self.best is None or score > self.best):
                self.best = float(score)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or not self.names:
            return
        self.score(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A run stopped by its time budget (or at a step between validations) is scored once more
        at its last step, so the weights of its final, annealed stretch are not lost."""
        if trainer.global_rank != 0 or not self.names or trainer.global_step == 0:
            return
        if not self.history or trainer.global_step - self.history[-1]["step"] >= self.end_gap:
            self.score(trainer, module)
        self.choose(trainer, module)

    def choose(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Export the final weights to ``out/best`` unless a validation beat them by more than two
        standard errors of the difference: a few episodes per task are noisy, and a lead within the
        noise chose worse weights than the annealed final ones (0.52 against 0.57 over 10 episodes
        per task, docs/results.md)."""
        final = self.history[-1] if self.history else None
        if (
            final is None
            or trainer.global_step - final["step"] >= self.end_gap
            or final.get("mean_score") is None
        ):
            return  # (scored within end_gap steps of the end: these weights, as good as scored)
        best = max(
            (h for h in self.history if h.get("mean_score") is not None), key=lambda h: h["mean_score"]
        )
        lead = best["mean_score"] - final["mean_score"]
        noise = 2.0 * float(np.hypot(best.get("stderr") or np.inf, final.get("stderr") or np.inf))
        if best is final or lead > noise:
            reason = "the final weights, also the best closed-loop score" if best is final else (
                f"the best closed-loop score's weights (step {best['step']}): its lead {lead:.3f} over "
                f"the final weights exceeds 2 standard errors ({noise:.3f})")  # fmt: skip
            self.chosen = {"step": best["step"], "reason": reason}
            saved = self.out / "best" / "meta.json"
            if saved.is_file():  # exported when it scored: the model card says which weights these are
                meta = json.loads(saved.read_text())
                meta.setdefault("rollout", {})["chosen"] = reason
                atomic_write_bytes(saved, (json.dumps(meta, indent=2) + "\n").encode())
        else:
            reason = (f"the final weights: the best closed-loop score's lead {lead:.3f} (step {best['step']}) "
                      f"is within 2 standard errors ({noise:.3f})")  # fmt: skip
            self.chosen = {"step": final["step"], "reason": reason}
            self.export(trainer, module, final, chosen=reason)
        self.write()
        print(f"[rollouts] exported: {self.chosen['reason']}", flush=True)

    def score(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Roll out every task, log the scores, keep the weights if they are the best so far."""
        from gato_like.policy import Policy
        from gato_like.training.evaluate import eval_seed, normalized_score, play_episode

        model = exported_model(trainer, module)  # the moving average when the run keeps one
        was_training = model.training
        started = time.perf_counter()
        checkpoint = Checkpoint(model, TextTokenizer(), self.specs, self.tasks)
        policy = Policy(checkpoint, device=module.device)
        scores: dict[str, float | None] = {}
        errors: dict[str, float] = {}  # standard error of each task's normalized score
        try:
            with torch.no_grad():
                # fresh seeds at every validation: weights chosen on the same few seeds each time
                # are chosen for those seeds (pendulum: 0.80 on them, 0.10 on 10 others)
                first = len(self.history) * self.episodes
                for name in self.names:
                    steps = int(self.tasks[name]["max_steps"])
                    returns = [
                        play_episode(
                            policy, name, eval_seed(name, 50 + self.seed, first + i), steps
                        ).episode_return
                        for i in range(self.episodes)
                    ]
                    normalizers = self.tasks[name]["returns"]
                    scores[name] = normalized_score(
                        float(np.mean(returns)), normalizers["expert"], normalizers.get("random")
                    )
                    if scores[name] is not None:  # the score is linear in the mean return
                        scale = abs(normalizers["expert"]["mean"] - normalizers["random"]["mean"])
                        spread = float(np.std(returns, ddof=1)) if len(returns) > 1 else np.inf
                        errors[name] = spread / scale / np.sqrt(len(returns))
        finally:
            model.train(was_training)
        valid = [s for s in scores.values() if s is not None]
        mean = float(np.mean(valid)) if valid else None
        stderr = float(np.sqrt(np.sum(np.square(list(errors.values())))) / len(errors)) if errors and len(errors) == len(valid) else None  # fmt: skip
        seconds = time.perf_counter() - started
        metrics = {f"rollout/{n}/score": s for n, s in scores.items() if s is not None}
        if mean is not None:
            metrics["rollout/mean_score"] = mean
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        clock = getattr(module, "train_seconds", None)
        entry = {
            "step": trainer.global_step,
            "minutes": round(clock() / 60.0, 2) if callable(clock) else None,
            "mean_score": mean,
            "stderr": None if stderr is None or not np.isfinite(stderr) else round(stderr, 4),
            "scores": scores,
            "seconds": round(seconds, 1),
        }
        self.history.append(entry)
        if mean is not None and (self.best is None or mean > self.best):
            self.best = mean
            self.export(trainer, module, entry)
        self.write()
        shown = ", ".join(f"{n.split('-', 1)[-1]} {s:.2f}" for n, s in scores.items() if s is not None)
        print(f"\n[rollouts] step {trainer.global_step}: mean score {mean if mean is None else round(mean, 3)} ({shown}; {seconds:.0f} s)", flush=True)  # fmt: skip

    def export(self, trainer: L.Trainer, module: L.LightningModule, entry: dict[str, Any], chosen: str | None = None) -> None:  # fmt: skip
        """The module's weights now, scored as ``entry``, to ``out/best``; ``chosen``: why these
        weights are the run's (at its end)."""
        model = exported_model(trainer, module)  # the moving average when the run keeps one
        meta = dict(self.meta(trainer, module))
        meta["rollout"] = {"step": entry["step"], "mean_score": round(entry["mean_score"], 4), "stderr": entry.get("stderr"),
                           "episodes": self.episodes, "scores": {n: None if s is None else round(s, 4) for n, s in entry["scores"].items()}}  # fmt: skip
        if chosen is not None:
            meta["rollout"]["chosen"] = chosen
        save_checkpoint(self.out / "best", model, TextTokenizer(), self.specs, self.tasks, meta)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "rollouts.json").write_text(
            json.dumps({"best": self.best, "chosen": self.chosen, "history": self.history}, indent=2) + "\n"
        )


def plot_scores(history: list[dict[str, Any]], path: Path) -> Path:
    """Closed-loop score per task and their mean against training minutes (optimizer steps where
    an entry has no minutes) from a run's ``rollouts.json`` history, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all(entry.get("minutes") is not None for entry in history)
    xs = [entry["minutes"] if timed else entry["step"] for entry in history]
    figure, axis = plt.subplots(figsize=(8.5, 4))
    for name in sorted({n for entry in history for n in entry["scores"]}):
        points = [
            (x, e["scores"][name])
            for x, e in zip(xs, history, strict=True)
            if e["scores"].get(name) is not None
        ]
        if points:
            axis.plot(*zip(*points, strict=True), ".-", linewidth=0.8, alpha=0.6, label=name)
    means = [
        (x, e["mean_score"]) for x, e in zip(xs, history, strict=True) if e.get("mean_score") is not None
    ]
    if means:
        axis.plot(*zip(*means, strict=True), "o-", color="black", linewidth=2, label="mean")
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    axis.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("training minutes" if timed else "optimizer step")
    axis.set_ylabel("expert-normalized score (closed loop)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
