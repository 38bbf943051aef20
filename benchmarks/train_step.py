"""Where a real training step's time goes: the `cpu` recipe's own ~4096-token task batches of a
dataset through forward, backward and AdamW, side by side in one run, with the goal head every 4th
step (as ``GatoLightning`` trains it by default), every 16th, or never, without the dynamics head,
and with torch's CPU flash-attention kernel (its default) against its plain "math" kernel; on a CPU
with bf16 units, also in fp32 (no autocast).

    .venv/bin/python benchmarks/train_step.py --data data/suite60 [--preset tiny] [--steps 48] [--repeats 2]
    .venv/bin/python benchmarks/train_step.py --data data/suite60h --backbones decoder,pooled --presets tiny,debug

Each row does the same optimizer steps on the same batches from the same initial weights, in bf16
autocast where the CPU has bf16 units (as Lightning's bf16-mixed: the forward only); each row's
time is the fastest of ``--repeats`` runs, the rows alternating.

``--backbones``: instead, the recipe's step (goal head every 4th step) once per timestep
representation and preset, each on its own batches of the same token budget (the loader counts
the tokens of Gato's layout for every representation, so the batches hold the same timesteps),
printing steps/s, tokens/s and timesteps/s side by side: tokens/s alone flatters a representation
that spends more backbone inputs on a timestep.

``--recipe NAME``: instead, that recipe's own model on its own batches (its token budgets, its
task mixing; control and BabyAI batches in the loader's proportions), the loader's milliseconds
per batch in the training process (the recipe's ``workers``: 0), then the model's step with the
goal head every 4th step (the recipe's), every 16th and never, and at the widths ``--widths``
(``n_embd x ff_dim``, optionally ``x n_layer``; the recipe's goal interval):

    .venv/bin/python benchmarks/train_step.py --data data/suite60p --recipe cpu --steps 40"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gato_like.config import Config
from gato_like.model import GatoModel
from gato_like.tokenizers import TokenType
from gato_like.training.data import GatoData
from gato_like.training.progress import count_timesteps
from gato_like.training.recipes import ACTING, get_recipe
from gato_like.training.train import cpu_has_bf16


def timed_steps(
    config: Config,
    batches: list[dict],
    bf16: bool,
    kernel: SDPBackend | None = None,
    goal_every: int = 4,
    dynamics: bool = True,
    autocast: bool = True,
) -> float:
    """Seconds of the optimizer steps over ``batches`` from fresh weights (seed 0), after 4
    warm-up steps: the goal head's pass every ``goal_every``th step (0: never), the policy loss
    alone without ``dynamics``, bf16 autocast (as Lightning's bf16-mixed) where ``bf16 and
    autocast``, attention through ``kernel`` where given."""
    torch.manual_seed(0)
    model = GatoModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    chosen = sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()
    with chosen:
        for i, batch in enumerate(batches[:4] + batches):  # 4 warm-up steps
            if i == len(batches[:4]):
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and autocast):
                out = model(batch)
                loss = out["loss"] if dynamics else out["policy_loss"]
                if goal_every and i % goal_every == 0 and "goal_ids" in batch:
                    loss = loss + model(batch, goal=True)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="the fastest of this many runs per row")
    parser.add_argument("--backbones", default="", help="comma list: the representations side by side")
    parser.add_argument("--presets", default="", help="with --backbones: comma list, one per backbone")
    parser.add_argument("--recipe", default="", help="a recipe's own model and batches (e.g. cpu)")
    parser.add_argument(
        "--widths", default="64x256,96x384,128x512", help="with --recipe: n_embd x ff_dim [x n_layer] rows"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipe:
        recipe_rows(args)
        return
    if args.backbones:
        side_by_side(args)
        return
    torch.manual_seed(0)
    config = Config.from_name(args.preset, **ACTING)
    data = GatoData(args.data, 1024, config.context_length, 0, seed=0,
                    history_steps=config.history_steps, discrete_history_steps=config.discrete_history_steps, batch_tokens=args.batch_tokens)  # fmt: skip
    stream = iter(data._loader(0))
    batches = [next(stream) for _ in range(args.steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    bf16 = cpu_has_bf16()
    print(f"{args.steps} real batches of {args.data}: {tokens / args.steps:.0f} tokens each on average; "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.threads} threads")  # fmt: skip

    rows = {
        "goal head every 4th step, flash kernel": (SDPBackend.FLASH_ATTENTION, 4, True),
        "goal head every 4th step, math kernel": (SDPBackend.MATH, 4, True),
        "goal head every 16th step": (None, 16, True),
        "no goal head": (None, 0, True),
        "no goal head, no dynamics head": (None, 0, False),
    }
    if bf16:  # the probe's choice against fp32 on the same CPU
        rows["fp32 instead of bf16 autocast (goal head every 4th)"] = (None, 4, True, False)
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every row alike
        for name, row in rows.items():
            seconds[name] = min(seconds.get(name, float("inf")), timed_steps(config, batches, bf16, *row))
    base = next(iter(seconds.values()))
    print(f"{'training step':52s} {'steps/s':>8s} {'tokens/s':>9s} {'speed-up':>8s}")
    for name, s in seconds.items():
        print(f"{name:52s} {args.steps / s:8.2f} {tokens / s:9.0f} {base / s:7.2f}x")


def side_by_side(args: argparse.Namespace) -> None:
    """The recipe's training step per (backbone, preset): steps/s, tokens/s and timesteps/s."""
    backbones = args.backbones.split(",")
    presets = args.presets.split(",") if args.presets else [args.preset] * len(backbones)
    if len(presets) != len(backbones):
        raise SystemExit(f"--presets: expected {len(backbones)} names (one per backbone), got {len(presets)}")
    bf16 = cpu_has_bf16()
    rows = {}
    for backbone, preset in zip(backbones, presets, strict=True):
        config = Config.from_name(preset, **ACTING, backbone=backbone)
        data = GatoData(args.data, 1024, config.context_length, 0, seed=0, history_steps=config.history_steps, discrete_history_steps=config.discrete_history_steps,
                        batch_tokens=args.batch_tokens, backbone=backbone,
                        perceiver_latents=config.perceiver_latents)  # fmt: skip
        stream = iter(data._loader(0))
        batches = [next(stream) for _ in range(args.steps)]
        rows[f"{backbone}, {preset}"] = (config, batches)
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every row alike
        for name, (config, batches) in rows.items():
            seconds[name] = min(seconds.get(name, float("inf")), timed_steps(config, batches, bf16))
    print(f"{args.steps} real batches of {args.data} per row, {args.batch_tokens}-token budget; "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.threads} threads")  # fmt: skip
    print(
        f"{'representation, preset':28s} {'steps/s':>8s} {'tokens/s':>9s} {'timesteps/s':>12s} {'timesteps/step':>15s}"
    )
    for name, (_, batches) in rows.items():
        s = seconds[name]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        timesteps = sum(count_timesteps(b) for b in batches)
        print(
            f"{name:28s} {args.steps / s:8.2f} {tokens / s:9.0f} {timesteps / s:12.0f} {timesteps / args.steps:15.0f}"
        )


def recipe_rows(args: argparse.Namespace) -> None:
    """A recipe's step: its loader's cost per batch, then goal intervals and widths side by side."""
    recipe = get_recipe(args.recipe)
    config = Config.from_name(recipe.preset, **recipe.model)
    data = GatoData(args.data, recipe.batch_size, config.context_length, 0, seed=0,
                    history_steps=config.history_steps, discrete_history_steps=config.discrete_history_steps,
                    batch_tokens=recipe.batch_tokens, discrete_batch_tokens=recipe.discrete_batch_tokens,
                    domain_weights=recipe.domain_weights or None, backbone=config.backbone,
                    mix_tasks=recipe.mix_tasks)  # fmt: skip
    stream = iter(data._loader(0))
    next(stream)  # the first batch fills the shuffle buffers
    start = time.perf_counter()
    batches = [next(stream) for _ in range(args.steps)]
    loader = (time.perf_counter() - start) / args.steps
    bf16 = cpu_has_bf16()
    rows: dict[str, tuple[Config, int]] = {
        f"goal head every {recipe.goal_every}th step (the recipe)": (config, recipe.goal_every),
        "goal head every 16th step": (config, 16),
        "no goal head": (config, 0),
    }
    for width in args.widths.split(","):
        n_embd, ff_dim, *layers = (int(x) for x in width.split("x"))
        n_layer = layers[0] if layers else config.n_layer
        if (n_embd, ff_dim, n_layer) != (config.n_embd, config.ff_dim, config.n_layer):
            rows[f"width {n_embd}, feed-forward {ff_dim}, {n_layer} layers"] = (
                replace(config, n_embd=n_embd, ff_dim=ff_dim, n_layer=n_layer),
                recipe.goal_every,
            )
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every row alike
        for name, (row_config, goal_every) in rows.items():
            took = timed_steps(row_config, batches, bf16, goal_every=goal_every)
            seconds[name] = min(seconds.get(name, float("inf")), took)
    discrete = sum(bool((b["types"] == int(TokenType.DISCRETE)).any()) for b in batches)
    print(f"{args.steps} batches of the {args.recipe!r} recipe on {args.data} ({discrete} of discrete observations); "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.threads} threads")  # fmt: skip
    print(f"the loader in the training process: {1e3 * loader:.0f} ms a batch")
    base = next(iter(seconds.values()))
    print(f"{'model step (forward, backward, AdamW)':52s} {'ms/step':>8s} {'speed-up':>8s}")
    for name, s in seconds.items():
        print(f"{name:52s} {1e3 * s / args.steps:8.0f} {base / s:7.2f}x")


if __name__ == "__main__":
    main()
