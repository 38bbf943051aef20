"""Training throughput against Hugging Face GPT-2, FLOP/s against this machine's matmul peak,
acting latency with the KV cache against recomputation, and peak memory. One run, side by side.

    .venv/bin/python benchmarks/model_speed.py [--presets tiny small] [--steps 6] [--compile]

Training: the same token batch (B=8, L=context) through our decoder and through a GPT-2
(``transformers.GPT2LMHeadModel``) of the same depth, width, heads, feed-forward size, vocabulary
and sequence length, both in fp32 and both with bf16 autocast; forward + backward + AdamW step.
FLOP/s counts 6 x (matmul parameters, output layer included) + 12 x layers x L x width per token.
Acting: ms per timestep (23 tokens + 1 action token, as a cartpole step) with the cache vs
recomputing the whole history, at 64, 256 and 1024 tokens of history.
"""

from __future__ import annotations

import argparse
import time

import torch

from gato_like.config import Config
from gato_like.model import GatoModel, KVCache
from gato_like.tokenizers import TokenType


def matmul_peak(size: int = 2048, dtype: torch.dtype = torch.float32, n: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * size**3 * n / (time.perf_counter() - start)


def flops_per_token(config: Config) -> float:
    d, layers = config.n_embd, config.n_layer
    matmul = layers * (4 * d * d + 2 * d * config.ff_dim) + config.vocab_size * d
    return 6 * matmul + 12 * layers * config.context_length * d


def batch_for(config: Config, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        config.text_vocab_size, config.text_vocab_size + 1024, (size, config.context_length), generator=g
    )
    types = torch.full_like(ids, int(TokenType.CONTINUOUS))
    types[:, 23::24] = int(TokenType.ACTION)  # a cartpole-like layout: one action every 24 tokens
    return {
        "ids": ids, "dynamics_ids": ids, "types": types, "local_positions": torch.arange(ids.shape[1]).remainder(24).expand_as(ids),
        "timesteps": (torch.arange(ids.shape[1]) // 24).expand_as(ids), "attention_mask": torch.ones_like(ids, dtype=torch.bool),
        "loss_mask": types == int(TokenType.ACTION),
    }  # fmt: skip


def train_rate(step, steps: int, tokens: int) -> float:
    step()  # warm up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens / (time.perf_counter() - start)


def ours(config: Config, batch: dict, bf16: bool, compiled: bool = False):  # type: ignore[no-untyped-def]
    model = GatoModel(config)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def gpt2(config: Config, batch: dict, bf16: bool):  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.ff_dim,
            attn_implementation="sdpa",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=False)
    labels = batch["ids"].masked_fill(~batch["loss_mask"], -100)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=batch["ids"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def acting_ms(config: Config, history: int, repeats: int = 10) -> tuple[float, float]:
    model = GatoModel(config).eval()
    x = torch.randn(1, history + 24, config.n_embd)
    cache = KVCache.empty(config, 1, x.device, x.dtype)
    model.step(x[:, :history], torch.ones(1, history, dtype=torch.bool), cache)
    base = int(cache.lengths[0])
    start = time.perf_counter()
    for _ in range(repeats):
        cache.lengths[0] = base
        model.step(x[:, history : history + 23], torch.ones(1, 23, dtype=torch.bool), cache)
        model.step(x[:, history + 23 : history + 24], torch.ones(1, 1, dtype=torch.bool), cache)
    cached = (time.perf_counter() - start) / repeats
    valid = torch.ones(1, history + 24, dtype=torch.bool)
    start = time.perf_counter()
    for _ in range(repeats):
        model._blocks(x[:, : history + 23], valid[:, : history + 23])
        model._blocks(x, valid)
    return cached * 1e3, (time.perf_counter() - start) / repeats * 1e3


def step_memory_mb(preset: str, batch: int) -> float:
    """Peak resident memory of two training steps of ``preset`` in a fresh process."""
    import subprocess
    import sys

    code = (
        "import resource, sys; sys.path.insert(0, 'benchmarks'); import model_speed as m;"
        f"c = m.Config.from_name('{preset}'); s = m.ours(c, m.batch_for(c, {batch}), False); s(); s();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers is not installed (pip install -e '.[bench]'): GPT-2 columns left out")
    peak32, peak16 = matmul_peak(), matmul_peak(512, torch.bfloat16, n=2)  # small: bf16 may be very slow
    print(f"matmul peak on this machine: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    fast_bf16 = peak16 > peak32
    if not fast_bf16:
        print("bf16 matmul is slower than fp32 here (no bf16 units on this CPU): timing fp32 only")
    print(
        f"{'preset':<7}{'params':>8}{'precision':>10}{'ours tok/s':>12}{'GPT-2 tok/s':>13}{'ratio':>7}{'FLOP/s':>10}{'of fp32 peak':>14}"
    )
    for name in args.presets:
        config = Config.from_name(name)
        batch = batch_for(config, args.batch)
        tokens = batch["ids"].numel()
        params = GatoModel(config).num_parameters()
        for bf16 in (False, True) if fast_bf16 else (False,):
            rate = train_rate(ours(config, batch, bf16), args.steps, tokens)
            hf = train_rate(gpt2(config, batch, bf16), args.steps, tokens) if have_hf else float("nan")
            flops = rate * flops_per_token(config)
            label = "bf16" if bf16 else "fp32"
            print(
                f"{name:<7}{params / 1e6:>7.1f}M{label:>10}{rate:>12,.0f}{hf:>13,.0f}{rate / hf:>6.2f}x{flops / 1e9:>8.0f}G{flops / peak32:>13.0%}"
            )
        if args.compile:
            rate = train_rate(ours(config, batch, fast_bf16, compiled=True), args.steps, tokens)
            print(f"{name:<7}{'':>8}{'compiled':>10}{rate:>12,.0f}")
    for name in args.presets:
        print(
            f"peak resident memory of a {name} training step (batch {args.batch}, fresh process): {step_memory_mb(name, args.batch):.0f} MB"
        )
    print("acting, ms per timestep (23 observation tokens + 1 action token), small preset:")
    config = Config.from_name("small", context_length=1100)
    for history in (64, 256, 1024):
        cached, full = acting_ms(config, history)
        print(
            f"  history {history:>5}: cache {cached:6.2f} ms, recompute {full:7.2f} ms, {full / cached:5.1f}x"
        )


if __name__ == "__main__":
    main()
