"""The network: embeddings, backbone, heads. One forward for training, one step for acting.

::

    ids, types, local_positions  ──► token embedding (text, continuous, discrete, separator ids)
    patches (P, 3, 16, 16)       ──► ResNet v2 patch block ──► + row/col interval embedding ─┐
                                     (scattered into the image positions of the sequence) ◄──┘
                                 + local position embedding (+ goal segment embedding)
    x (B, L, D) ──► N pre-norm blocks: causal SDPA with RoPE, GELU MLP ──► LayerNorm ──► h (B, L, D)
    h ──► policy head   (tied to the token embedding): next action / text token
      ──► dynamics head (adapter + tied): next timestep's proprio / discrete observation tokens
      ──► goal head     (adapter + tied): next action token, conditioned on a goal prefix

Acting uses :class:`KVCache`: each step feeds only the new tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gato_like.config import Config
from gato_like.timestep import GROUP_OF_TYPE as _GROUP_OF_TYPE
from gato_like.timestep import POOLED_GROUPS
from gato_like.tokenizers.vocab import TokenType


def patch_intervals(positions: Tensor, resolution: int) -> Tensor:
    """Quantized row/column intervals of patches (the torch twin of
    :func:`gato_like.tokenizers.image.patch_position_intervals`).

    Args:
        positions: int ``(..., 4)``: (row, col, rows, cols).

    Returns:
        int64 ``(..., 2, 2)``: ``[..., axis, (start, stop)]``.
    """
    index, count = positions[..., :2].long(), positions[..., 2:].long().clamp(min=1)
    start = (index * resolution) // count
    stop = torch.maximum(((index + 1) * resolution) // count, start + 1).clamp(max=resolution)
    return torch.stack([start, stop], dim=-1)


class PatchEncoder(nn.Module):
    """A ResNet v2 (pre-activation) block per 16x16 patch, then a projection: ``(N, C, P, P) -> (N, D)``.

    ``stride`` 1 (Gato): a 3x3 stem and the block at the patch's full resolution. ``stride`` 4
    (``image_encoder="strided"``): a 4x4 stride-4 stem, then the block at 4x4; the pooled
    features the projection reads have the same shape.

    Within-image position: learned row and column embeddings of the patch's quantized interval;
    an index is drawn uniformly inside the interval in training and the interval's mean is used
    in evaluation (Gato section 2.2).
    """

    def __init__(self, config: Config, hidden: int = 32, stride: int = 1) -> None:
        super().__init__()
        c = config.patch_channels
        self.resolution = config.patch_position_resolution
        self.stem = (
            nn.Conv2d(c, hidden, 3, padding=1) if stride == 1 else nn.Conv2d(c, hidden, stride, stride=stride)
        )
        self.norm1 = nn.GroupNorm(8, hidden)
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm_out = nn.GroupNorm(8, hidden)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(hidden * 16, config.n_embd)
        self.row = nn.Embedding(self.resolution, config.n_embd)
        self.col = nn.Embedding(self.resolution, config.n_embd)

    def forward(self, patches: Tensor, positions: Tensor) -> Tensor:
        x = self.stem(patches)  # (N, h, P / stride, P / stride)
        y = self.conv1(F.gelu(self.norm1(x)))
        y = self.conv2(F.gelu(self.norm2(y)))
        x = F.gelu(self.norm_out(x + y))
        x = self.proj(self.pool(x).flatten(1))  # (N, D)
        intervals = patch_intervals(positions, self.resolution)  # (N, 2, 2)
        if self.training:
            width = (intervals[..., 1] - intervals[..., 0]).float()
            index = intervals[..., 0] + (torch.rand_like(width) * width).long()
        else:
            index = (intervals[..., 0] + intervals[..., 1] - 1) // 2
        return x + self.row(index[:, 0]) + self.col(index[:, 1])


class TimmPatchEncoder(nn.Module):
    """A timm backbone as the patch encoder (``image_encoder="timm"``)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError(
                "image_encoder='timm' needs timm (and a torchvision that imports beside your torch): "
                "pip install 'gato-like[timm]'"
            ) from error
        self.body = timm.create_model(
            config.timm_model, pretrained=False, num_classes=0, in_chans=config.patch_channels
        )
        self.proj = nn.Linear(self.body.num_features, config.n_embd)
        self.positions = PatchEncoder(config, hidden=8)  # reuse its row/col embeddings

    def forward(self, patches: Tensor, positions: Tensor) -> Tensor:
        x = self.proj(self.body(patches))
        intervals = patch_intervals(positions, self.positions.resolution)
        index = (intervals[..., 0] + intervals[..., 1] - 1) // 2
        return x + self.positions.row(index[:, 0]) + self.positions.col(index[:, 1])


def rope_tables(positions: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin ``(B, 1, T, hd/2)`` of the rotary embedding at absolute ``positions`` (B, T)."""
    half = head_dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.to(torch.float32)[:, None, :, None] * freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x`` (B, H, T, hd) by the tables of :func:`rope_tables`."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences that grow at different rates.

    ``k``/``v``: per layer ``(B, H, capacity, hd)``; ``lengths`` (B,) valid entries per row.

    A cache is never shifted: the keys of a layer above the first depend on every earlier token,
    so a window that drops old timesteps is re-encoded from its tokens (see ``gato_like.acting``), which
    keeps cached and uncached logits equal across a roll-over.
    """

    k: list[Tensor]
    v: list[Tensor]
    lengths: Tensor

    @classmethod
    def empty(cls, config: Config, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, config.n_head, config.context_length, config.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


class ValueEmbedding(nn.Module):
    """Ordinal embedding of continuous-bin ids: ``(...,)`` bin index in [0, bins) -> ``(..., D)``.

    The bin's position ``u`` in [-1, 1] goes through Fourier features
    ``[u, sin(pi k u), cos(pi k u)]`` and one linear layer, so nearby bins get nearby embeddings
    from the start (a departure from Gato, whose bins are independent rows). ``linear``: k = 1..
    ``frequencies``, which tells bins apart only ~``bins / (2 frequencies)`` bins apart (32 of
    1024 with 16: about 4 cm at 0.1 m after mu-law); ``geometric``: k from 1 to ``bins / 2`` in
    equal ratios, down to neighbouring bins.
    """

    def __init__(self, dim: int, bins: int, frequencies: int = 16, spacing: str = "linear") -> None:
        super().__init__()
        self.bins = bins
        if spacing not in ("linear", "geometric"):
            raise ValueError(f"spacing: expected 'linear' or 'geometric', got {spacing!r}")
        k = (
            torch.arange(1, frequencies + 1, dtype=torch.float32)
            if spacing == "linear"
            else torch.logspace(0, math.log2(bins / 2), frequencies, base=2.0)
        )
        self.register_buffer("freqs", k * math.pi, persistent=False)
        self.proj = nn.Linear(2 * frequencies + 1, dim)

    def forward(self, bins: Tensor) -> Tensor:
        u = (2.0 * bins.float() + 1.0) / self.bins - 1.0  # bin centre in [-1, 1]
        angles = u[..., None] * self.get_buffer("freqs")
        return self.proj(torch.cat([u[..., None], angles.sin(), angles.cos()], dim=-1))


class OffsetEmbedding(nn.Module):
    """Embedding of a signed offset between two bin centres: ``(...,)`` in [-2, 2] -> ``(..., D)``.

    The offset is compressed, ``c = sign(d) log(1 + k|d|) / log(1 + 2k)`` (k = 64), so the last few
    bins before a goal are as far apart as the first few hundred, then goes through Fourier
    features ``[c, sin(pi f c), cos(pi f c)]`` (``frequencies`` values of f from 1 to
    ``2**octaves`` in equal ratios) and one linear layer. ``c`` itself is a feature: its sign, the
    way to go, is one linear read. Low frequencies (``octaves`` 2) keep the embedding smooth in the
    offset, so what was learned at the offsets seen carries over to unseen ones; up to 256 (8, the
    first version) the features told offsets a bin apart and the goal head learned less
    (docs/results.md).
    """

    def __init__(
        self, dim: int, frequencies: int = 16, sharpness: float = 64.0, octaves: float = 2.0
    ) -> None:
        super().__init__()
        self.sharpness = sharpness
        k = torch.logspace(0, octaves, frequencies, base=2.0)
        self.register_buffer("freqs", k * math.pi, persistent=False)
        self.proj = nn.Linear(2 * frequencies + 1, dim)

    def forward(self, offset: Tensor) -> Tensor:
        c = offset.sign() * torch.log1p(self.sharpness * offset.abs()) / math.log1p(2 * self.sharpness)
        angles = c[..., None] * self.get_buffer("freqs")
        return self.proj(torch.cat([c[..., None], angles.sin(), angles.cos()], dim=-1))


class GoalFold(NamedTuple):
    """A goal placed in every pooled timestep (``goal_placement`` ``timestep`` or ``relative``)."""

    sum: Tensor
    """``(B, groups, W)``: the goal's share of every timestep's fold (:meth:`TimestepPool.goal_fold`)."""
    values: Tensor | None = None
    """``(B, groups, P)``: the goal's continuous values (bin centres in [-1, 1]) by group and
    position (``relative`` only, :meth:`GatoModel.goal_values`)."""
    present: Tensor | None = None
    """``(B, groups, P)`` True where the goal has such a value."""


def hl_gauss_targets(bins: Tensor, count: int, sigma: float) -> Tensor:
    """HL-Gauss target distributions ``(N, count)`` for target bins ``(N,)``: the mass of a normal
    centred on each target bin's centre (standard deviation ``sigma`` bins) that falls in each bin,
    renormalized over the ``count`` bins."""
    edges = torch.arange(count + 1, device=bins.device, dtype=torch.float32)
    cdf = torch.special.ndtr((edges[None, :] - (bins.float()[:, None] + 0.5)) / sigma)
    mass = cdf[:, 1:] - cdf[:, :-1]
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, config.ff_dim)
        self.fc_out = nn.Linear(config.ff_dim, config.n_embd)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        tables: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
        cache: tuple[Tensor, Tensor] | None = None,
        write_at: Tensor | None = None,
        upto: int | None = None,
    ) -> Tensor:
        """``x`` (B, T, D); ``tables`` rotary cos/sin; ``cache`` this layer's (keys, values) to write the
        new keys into at ``write_at`` (B, T) and attend over up to ``upto`` entries."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rope(q, tables), rope(k, tables)  # (B, H, T, hd)
        if cache is not None:
            assert write_at is not None
            keys, values = cache
            index = write_at[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
            k, v = keys[:, :, :upto], values[:, :, :upto]
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)), dropout, self.training)
        return x + F.dropout(self.fc_out(F.gelu(self.fc(self.ln_2(x)))), dropout, self.training)


class CrossAttention(nn.Module):
    """Latent queries attend to a timestep's observation tokens, then an MLP (both pre-norm)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        d = config.n_embd
        self.ln_q, self.ln_kv, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, config.n_head, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, config.ff_dim), nn.GELU(), nn.Linear(config.ff_dim, d))

    def forward(self, queries: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """``queries`` (B, Q, D), ``tokens`` (B, L, D), ``mask`` (B, Q, L) True where allowed -> (B, Q, D)."""
        kv = self.ln_kv(tokens)
        q, k, v = self.ln_q(queries), kv, kv
        heads = self.attention.num_heads
        attn_mask = ~mask.repeat_interleave(heads, dim=0)  # MultiheadAttention: True = blocked
        y, _ = self.attention(q, k, v, attn_mask=attn_mask, need_weights=False)
        x = queries + y
        return x + self.mlp(self.ln_2(x))


def token_groups(types: Tensor) -> Tensor:
    """Group of every position ``(B, L)`` (see ``_GROUP_OF_TYPE``)."""
    table = torch.tensor(_GROUP_OF_TYPE, device=types.device)
    return table[types.long().clamp(0, len(_GROUP_OF_TYPE) - 1)]


def run_firsts(starts: Tensor) -> Tensor:
    """Index ``(B, L)`` of the first position of each position's run, runs starting where
    ``starts`` (B, L) is True (position 0 always starts one)."""
    index = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    starts = starts.clone()
    starts[:, 0] = True
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def group_positions(types: Tensor, local_positions: Tensor) -> Tensor:
    """Each token's index inside its group of its timestep ``(B, L)``: the n-th value of an
    observation is n whatever text or image precedes it; the separator is 0 and action j is j + 1.
    A group starts where the local position is 0 (a new timestep) or the group changes, so whole
    timesteps must be given (the acting core numbers single action tokens itself)."""
    groups = token_groups(types)
    start = torch.ones_like(groups, dtype=torch.bool)
    start[:, 1:] = (groups[:, 1:] != groups[:, :-1]) | (local_positions[:, 1:] == 0)
    return torch.arange(types.shape[1], device=types.device) - run_firsts(start)


VALUE_COUNTS = 64
"""Rows of the ``value_count_embedding`` table: groups of 63 values and more share the last."""


def value_counts(types: Tensor, group_positions: Tensor) -> Tensor:
    """Per token ``(B, L)``, how many tokens its timestep's values group holds (0 outside the
    values group). ``group_positions`` (B, L): each token's index in its group
    (:func:`group_positions`), so a group starts where a values token has index 0."""
    values = token_groups(types) == _GROUP_OF_TYPE[int(TokenType.CONTINUOUS)]
    run = (values & (group_positions == 0)).long().cumsum(1)  # (B, L): the group's number
    counts = torch.zeros(types.shape[0], types.shape[1] + 1, dtype=torch.long, device=types.device)
    counts.scatter_add_(1, run, values.long())
    return counts.gather(1, run) * values


def position_problem(config: Config, body: str, sizes: dict[str, int]) -> str | None:
    """Why a body's timesteps would not fit the model's position table, or None. ``sizes``: tokens
    per timestep of each fixed-size group (``SequenceBuilder.group_sizes``). A pooled timestep
    numbers each group from 0; the other backbones number the whole timestep."""
    rows = config.max_local_positions
    if config.backbone == "pooled":
        group, largest = max(sizes.items(), key=lambda item: item[1])
        if largest > rows:
            return (f"{body}: its {group} group has {largest} tokens per timestep but the model's "
                    f"position table (max_local_positions) has {rows} rows")  # fmt: skip
        return None
    total = sum(sizes.values())
    if total > rows:
        return (f"{body}: one timestep has {total} tokens ({sizes}) but the model's position "
                f"table (max_local_positions) has {rows} rows")  # fmt: skip
    return None


def once_per_key(mlp: nn.Module, rows: Tensor, index: Tensor, key: Tensor) -> Tensor:
    """``mlp`` over ``rows[index]`` ``(N, D) -> (N, out)``, run once per distinct ``key`` ``(N,)``
    and gathered back (tokens with equal keys have equal rows: :meth:`GatoModel.pool_keys`).
    ``index_select`` both ways: its backward is an ``index_add``, not an ``index_put``."""
    distinct, inverse = torch.unique(key, return_inverse=True)
    first = torch.empty_like(distinct).scatter_(0, inverse, index)  # one row per key
    return mlp(rows.index_select(0, first)).index_select(0, inverse)


def pre_norm_mlp(config: Config, out: int | None = None) -> nn.Sequential:
    """``LayerNorm -> Linear(D, ff_dim) -> GELU -> Linear(ff_dim, out)``, ``(..., D) -> (..., out)``
    (``out`` defaults to D): the pooled fold's per-token MLPs and the pooled dynamics readout's."""
    d = config.n_embd
    return nn.Sequential(
        nn.LayerNorm(d), nn.Linear(d, config.ff_dim), nn.GELU(), nn.Linear(config.ff_dim, out or d)
    )


class TimestepPool(nn.Module):
    """The ``pooled`` representation's fold: each (timestep, group) of observation tokens becomes
    one token, ``LayerNorm(sum_i MLP(LayerNorm(e_i))) + group embedding`` (DeepSets), where ``e_i`` is the token's
    input embedding (id, value, position inside its group). Summing a per-token nonlinearity lets
    the one token carry a nonlinear function of every value and its dimension, which an attention
    average over linear values does only slowly (docs/model.md). With ``pool_width`` W > 0 the
    sum is W wide and the token is ``LayerNorm(Linear(W, D)(GELU(LayerNorm(sum))))``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        d = config.n_embd
        self.width = config.pool_width or d  # the sum's width

        # pre-norm: the embeddings start ~0.1 in scale, where GELU is nearly linear and the sum
        # would start as the linear average an attention pool computes
        self.mlp = pre_norm_mlp(config, self.width)
        # DeepSets' outer function when the sum is wider than the backbone (pool_width)
        self.outer = (
            nn.Sequential(nn.LayerNorm(self.width), nn.GELU(), nn.Linear(self.width, d))
            if config.pool_width
            else None
        )
        self.norm = nn.LayerNorm(d)
        self.group = nn.Parameter(torch.zeros(POOLED_GROUPS, d))
        # the goal's own MLP: through the fold's, goal value n and observation value n would add
        # up symmetrically (the goal segment's vector starts at zero), and a sum symmetric in the
        # two cannot carry their difference, which is what reaching needs
        self.goal_mlp = pre_norm_mlp(config, self.width) if config.goal_placement != "prefix" else None
        # pool_condition "text": the values read the timestep's folded text through their own MLP
        # (FiLM-like: the text shifts a small hidden layer that each value's embedding feeds)
        self.condition: nn.Module | None = None
        self.condition_in: nn.Module | None = None
        self.condition_out: nn.Module | None = None
        if config.pool_condition == "text":
            self.condition = nn.Sequential(nn.LayerNorm(self.width), nn.Linear(self.width, d))
            self.condition_in = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
            self.condition_out = nn.Linear(d, self.width)

    def forward(
        self,
        x: Tensor,
        slot: Tensor,
        observation: Tensor,
        slots: int,
        keys: Tensor | None = None,
        fold: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fold token embeddings ``x`` (B, L, D) whose ``observation`` (B, L) is True into ``slots``
        tokens per row at ``slot`` (B, L; slot = step * groups + group).

        ``keys`` (B, L), optional: tokens with the same key ``>= 0`` have the same embedding (the
        same id, position and segment: :meth:`GatoModel.pool_keys`), so the per-token MLP runs once
        per distinct key and is gathered back (an image patch's key is its own). The
        result is the same sum; a BabyAI view repeats a few (value, cell) pairs across a batch,
        and its ~150 tokens a timestep through the MLP were most of a BabyAI step.

        ``fold`` ``(B, groups, W)``, optional: a sum of MLP outputs (:meth:`goal_fold`) added to
        every filled slot of its group before the norm, as if those tokens were in each timestep
        (W: the sum's width, ``pool_width`` or D).

        Returns:
            ``(B, slots, D)`` pooled tokens and ``(B, slots)`` True where a slot received a token.
        """
        b, _, d = x.shape
        w = self.width
        where = slot.masked_fill(~observation, 0)
        if keys is None:
            z = self.mlp(x) * observation[..., None].to(x.dtype)
            pooled = x.new_zeros(b, slots, w).scatter_add_(1, where[..., None].expand(-1, -1, w), z)
        else:
            rows = x.reshape(-1, d)
            index = observation.reshape(-1).nonzero().squeeze(1)  # (N,) the observation tokens
            key = keys.reshape(-1)[index]
            key = torch.where(key < 0, -1 - index, key)  # an image patch: a key of its own
            z = once_per_key(self.mlp, rows, index, key).to(x.dtype)  # (N, W)
            target = torch.div(index, slot.shape[1], rounding_mode="floor") * slots + where.reshape(-1)[index]
            pooled = x.new_zeros(b * slots, w).index_add_(0, target, z).view(b, slots, w)
        filled = torch.zeros(b, slots, device=x.device).scatter_add_(1, where, observation.float()) > 0
        group = torch.arange(slots, device=x.device) % POOLED_GROUPS
        if self.condition is not None:
            pooled = pooled + self.conditioned(x, slot, observation, pooled, filled, keys)
        if fold is not None:
            pooled = pooled + fold[:, group].to(pooled.dtype) * filled[..., None].to(pooled.dtype)
        if self.outer is not None:
            pooled = self.outer(pooled)
        return self.norm(pooled) + self.group[group], filled

    def conditioned(
        self,
        x: Tensor,
        slot: Tensor,
        observation: Tensor,
        pooled: Tensor,
        filled: Tensor,
        keys: Tensor | None = None,
    ) -> Tensor:
        """``pool_condition`` ``text``: ``(B, slots, W)``, in each values slot whose timestep has
        text the sum over its values of ``out(GELU(in(e_i) + condition(text sum)))``, zero
        elsewhere: the text shifts a D-wide hidden layer of every value (FiLM's shift). ``in`` runs
        once per distinct key as the fold's MLP does; only the GELU and ``out`` run per token.
        ``x`` (B, L, D), ``slot``, ``observation`` and ``keys`` (B, L) as :meth:`forward`'s;
        ``pooled`` (B, slots, W) the plain sums, ``filled`` (B, slots)."""
        assert self.condition is not None and self.condition_in is not None and self.condition_out is not None
        b, slots, w = pooled.shape
        steps = slots // POOLED_GROUPS
        text_group, values_group = (
            _GROUP_OF_TYPE[int(TokenType.TEXT)],
            _GROUP_OF_TYPE[int(TokenType.CONTINUOUS)],
        )
        text = pooled.view(b, steps, POOLED_GROUPS, w)[:, :, text_group]  # (B, T, W)
        has_text = filled.view(b, steps, POOLED_GROUPS)[:, :, text_group]  # (B, T)
        step = torch.div(slot, POOLED_GROUPS, rounding_mode="floor").clamp(min=0, max=steps - 1)
        value = observation & (slot % POOLED_GROUPS == values_group)
        value = value & torch.gather(has_text, 1, step)
        row, column = value.nonzero(as_tuple=True)  # (N,) the conditioned value tokens
        out = pooled.new_zeros(b * slots, w)
        if len(row) == 0:
            return out.view(b, slots, w)
        # flat indices and index_select: their backward is an index_add, not an index_put
        flat = row * x.shape[1] + column
        rows = x.reshape(-1, x.shape[-1])
        if keys is None:
            hidden = self.condition_in(rows.index_select(0, flat))  # (N, D)
        else:  # (a value token's key is never an image patch's -1)
            hidden = once_per_key(self.condition_in, rows, flat, keys.reshape(-1).index_select(0, flat))
        shift = (
            self.condition(text).reshape(b * steps, -1).index_select(0, row * steps + step.reshape(-1)[flat])
        )
        z = self.condition_out(F.gelu(hidden + shift.to(hidden.dtype)))  # (N, W)
        return out.index_add(0, row * slots + slot.reshape(-1)[flat], z.to(out.dtype)).view(b, slots, w)

    def goal_fold(self, g: Tensor, types: Tensor, valid: Tensor) -> Tensor:
        """The goal's share of every timestep's fold: ``(B, groups, W)``, per group the sum of the
        goal's own MLP over its embedded tokens ``g`` ``(B, G, D)`` (the goal segment's vector
        included) whose ``valid`` ``(B, G)`` is True; ``types`` ``(B, G)``."""
        b, w = g.shape[0], self.width
        mlp = self.goal_mlp if self.goal_mlp is not None else self.mlp
        z = mlp(g).to(g.dtype) * valid[..., None].to(g.dtype)
        group = token_groups(types).clamp(max=POOLED_GROUPS - 1)
        return g.new_zeros(b, POOLED_GROUPS, w).scatter_add_(1, group[..., None].expand(-1, -1, w), z)


class GatoModel(nn.Module):
    """Embeddings + causal decoder + policy, dynamics and goal heads."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.tokens = nn.Embedding(config.vocab_size, d)
        layout = config.layout
        ranges = layout.ranges()
        self.continuous_range, self.discrete_range = ranges["continuous"], ranges["discrete"]
        self.text_size = layout.text_size
        self.values = (
            ValueEmbedding(d, layout.continuous_bins, spacing=config.value_frequencies)
            if config.value_embedding != "off"
            else None
        )
        self.local = nn.Embedding(config.max_local_positions, d)
        self.value_count = nn.Embedding(VALUE_COUNTS, d) if config.value_count_embedding else None
        self.goal_segment = nn.Parameter(torch.zeros(d))
        self.goal_offset = (
            OffsetEmbedding(d, octaves=config.goal_offset_octaves)
            if config.goal_placement == "relative"
            else None
        )
        self.masked_action = nn.Parameter(torch.zeros(d)) if config.action_input_dropout > 0 else None
        self.patches: nn.Module = (
            TimmPatchEncoder(config)
            if config.image_encoder == "timm"
            else PatchEncoder(config, stride=4 if config.image_encoder == "strided" else 1)
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        if config.backbone == "perceiver":
            self.latents = nn.Parameter(torch.randn(config.perceiver_latents, d) * 0.02)
            self.cross = CrossAttention(config)
        if config.backbone == "pooled":
            self.pool = TimestepPool(config)
        self.ln_f = nn.LayerNorm(d)
        rank = max(d // 8, 16)  # small bottleneck adapters: the heads share the trunk and the output layer
        self.dynamics_adapter = nn.Sequential(nn.Linear(d, rank), nn.GELU(), nn.Linear(rank, d))
        self.goal_adapter = nn.Sequential(nn.Linear(d, rank), nn.GELU(), nn.Linear(rank, d))
        # pooled timesteps' dynamics readout: one hidden state and a value's position -> that value
        self.readout_mlp = (
            pre_norm_mlp(config) if config.backbone == "pooled" and config.dynamics_readout == "mlp" else None
        )
        self.apply(self._init)
        for block in self.blocks:  # GPT-2 scaled init of residual projections
            assert isinstance(block, Block)
            for p in (block.proj.weight, block.fc_out.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        # residual branches start at zero: the heads as the policy head, the readout MLP as the
        # adapter's readout alone
        if self.value_count is not None:  # starts as the model without it
            nn.init.zeros_(self.value_count.weight)
        for adapter in (self.dynamics_adapter, self.goal_adapter, self.readout_mlp):
            if adapter is None:
                continue
            out_layer = adapter[-1]
            assert isinstance(out_layer, nn.Linear)
            nn.init.zeros_(out_layer.weight)
            nn.init.zeros_(out_layer.bias)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- embedding -----------------------------------------------------------------------------

    def position_problem(self, body: str, sizes: dict[str, int]) -> str | None:
        """:func:`position_problem` for this model's config."""
        return position_problem(self.config, body, sizes)

    def input_positions(self, types: Tensor, local_positions: Tensor) -> Tensor:
        """The local positions ``(B, L)`` the embedding reads for whole timesteps of tokens: the
        layout's own (decoder, perceiver), or each token's index inside its group (``pooled``: a
        value's embedding names its dimension, whatever precedes it). Raises ``ValueError`` when a
        position does not fit the position table (``max_local_positions``); on an accelerator a
        device-side assert, which does not wait for the device."""
        if self.config.backbone == "pooled":
            local_positions = group_positions(types, local_positions)
        if not local_positions.numel():
            return local_positions
        rows = self.config.max_local_positions
        if local_positions.device.type != "cpu":  # no host sync per forward (training and acting
            # refuse such bodies before any work: this catches what slipped past them)
            torch._assert_async(local_positions.max() < rows, "local position past max_local_positions")
        elif int(local_positions.max()) >= rows:
            raise ValueError(
                f"a timestep holds a token at local position {int(local_positions.max())} but the model's "
                f"position table (max_local_positions) has {self.config.max_local_positions} rows: "
                f"a body with fewer values per observation group, or a model with a larger table"
            )
        return local_positions

    def pool_keys(
        self, ids: Tensor, types: Tensor, local_positions: Tensor, segment: int = 0
    ) -> Tensor | None:
        """Per token ``(B, L)``, a key that names its input embedding: tokens with equal keys embed
        alike (:meth:`embed` reads only the id and the position, plus the goal segment's vector
        for ``segment`` 1), so the pooled fold runs its MLP once per key (:class:`TimestepPool`).
        ``-1`` for an image patch (its embedding is the pixels': the fold runs it on its own).
        None unless ``pooled``.

        Args:
            ids, types: ``(B, L)``; local_positions: ``(B, L)`` as :meth:`input_positions` gives them.
        """
        if self.config.backbone != "pooled":
            return None
        rows = self.config.max_local_positions
        token = ids.clamp(0, self.config.vocab_size - 1).long()
        local = local_positions.clamp(0, rows - 1).long()
        keys = ((segment * self.config.vocab_size) + token) * rows + local
        if self.value_count is not None:  # the group's size is part of the embedding
            keys = keys * VALUE_COUNTS + value_counts(types, local_positions).clamp(max=VALUE_COUNTS - 1)
        return keys.masked_fill(types == int(TokenType.IMAGE), -1)

    def goal_values(
        self, ids: Tensor, types: Tensor, local_positions: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """A goal's continuous values by (group, position), for ``goal_placement="relative"``:
        ``(B, groups, P)`` bin centres in [-1, 1] and ``(B, groups, P)`` True where the goal has one.

        Args:
            ids, types, valid: ``(B, G)`` the goal's tokens; local_positions: ``(B, G)`` as
                :meth:`input_positions` gives them (a value's index inside its group).
        """
        low, high = self.continuous_range
        rows = self.config.max_local_positions
        b = ids.shape[0]
        has = valid & (types == int(TokenType.CONTINUOUS)) & (ids >= low) & (ids < high)
        u = (2.0 * (ids - low).clamp(0, high - low - 1).float() + 1.0) / (high - low) - 1.0
        slot = token_groups(types).clamp(max=POOLED_GROUPS - 1) * rows + local_positions.clamp(0, rows - 1)
        slot = slot.masked_fill(~has, POOLED_GROUPS * rows)  # one spare column takes the rest
        values = u.new_zeros(b, POOLED_GROUPS * rows + 1).scatter_(1, slot, u * has)
        present = torch.zeros_like(values, dtype=torch.bool).scatter_(1, slot, has)
        return values[:, :-1].view(b, POOLED_GROUPS, rows), present[:, :-1].view(b, POOLED_GROUPS, rows)

    def offset_goal(
        self, x: Tensor, ids: Tensor, types: Tensor, local_positions: Tensor, fold: GoalFold
    ) -> Tensor:
        """Token embeddings ``x`` ``(B, L, D)`` with, at each continuous observation value whose goal
        has a value at the same (group, position), the embedding of their offset (goal minus
        value) added: the fold's per-token MLP then reads value, dimension and the way to the goal
        together. ``x`` unchanged without ``goal_placement="relative"``.

        Args:
            ids, types: ``(B, L)``; local_positions: ``(B, L)`` as :meth:`input_positions` gives them;
            fold: the goal (:class:`GoalFold` with ``values``, batch 1 or B).
        """
        if self.goal_offset is None or fold.values is None or fold.present is None:
            return x
        low, high = self.continuous_range
        rows = self.config.max_local_positions
        b = ids.shape[0]
        slot = token_groups(types).clamp(max=POOLED_GROUPS - 1) * rows + local_positions.clamp(0, rows - 1)
        values = fold.values.flatten(1).expand(b, -1)
        present = fold.present.flatten(1).expand(b, -1)
        has = present.gather(1, slot) & (types == int(TokenType.CONTINUOUS)) & (ids >= low) & (ids < high)
        u = (2.0 * (ids - low).clamp(0, high - low - 1).float() + 1.0) / (high - low) - 1.0
        offset = (values.gather(1, slot) - u) * has
        return x + self.goal_offset(offset).to(x.dtype) * has[..., None].to(x.dtype)

    def embed(
        self,
        ids: Tensor,
        types: Tensor,
        local_positions: Tensor,
        patches: Tensor | None = None,
        patch_positions: Tensor | None = None,
        patch_mask: Tensor | None = None,
        show_actions: bool = False,
    ) -> Tensor:
        """Token embeddings ``(B, L, D)``; image positions take their patch's embedding.
        ``show_actions``: action tokens are inputs even where the config masks them (the
        dynamics head's pass with ``dynamics_inputs="executed"``).

        Args:
            ids, types, local_positions: ``(B, L)``.
            patches: ``(B, P, 3, 16, 16)``, ``patch_positions`` ``(B, P, 4)``, ``patch_mask`` ``(B, P)``;
                the valid patches of row b fill row b's image positions in order.
        """
        local = local_positions.clamp(max=self.config.max_local_positions - 1)
        x = self.tokens(ids.clamp(0, self.config.vocab_size - 1)) + self.local(local)
        if self.values is not None:
            low, high = self.continuous_range
            continuous = (ids >= low) & (ids < high)
            value = self.values((ids - low).clamp(0, high - low - 1))
            if self.config.value_embedding == "replace":  # the per-bin row does not enter the input
                x = torch.where(continuous[..., None], value + self.local(local), x)
            else:
                x = x + value * continuous[..., None]
        if self.value_count is not None:  # whole timesteps: local_positions index each group
            counts = value_counts(types, local_positions)
            x = x + self.value_count(counts.clamp(max=VALUE_COUNTS - 1)) * (counts > 0)[..., None].to(x.dtype)
        if not show_actions and self.masked_action is not None and self.config.action_input_dropout >= 1.0:
            # actions are never inputs (training and acting alike): every one is the mask embedding
            x = torch.where(
                (types == int(TokenType.ACTION))[..., None], self.masked_action + self.local(local), x
            )
        image = types == int(TokenType.IMAGE)
        if patches is not None and patches.shape[1] and bool(image.any()):
            mask = patch_mask if patch_mask is not None else torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)  # fmt: skip
            assert patch_positions is not None
            embedded = self.patches(patches[mask].to(x.dtype), patch_positions[mask])
            x = x.clone()
            x[image] = embedded.to(x.dtype) + self.local(local[image])
        return x

    # -- training ------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any], goal: bool = False, logits: bool = False) -> dict[str, Tensor]:
        """Logits and losses of a padded batch (the loader's collate output).

        Returns ``hidden`` (B, L', D), ``loss`` and the per-head losses (logits are computed only at
        the target positions); with ``logits=True`` also ``policy_logits``/``dynamics_logits``
        (B, L, V). With ``goal=True`` the batch's goal observation is prepended (L' = goal tokens
        + L; with ``goal_placement`` ``timestep`` or ``relative`` it joins every timestep's fold instead,
        L' = L) and the goal head's loss (and ``goal_logits``) replaces the policy and dynamics heads'.
        The dynamics head's targets are ``dynamics_ids`` (B, L; -1 where there is none) when
        ``config.dynamics_target`` is ``delta`` (a batch without them is scored on its discrete
        observations only), else ``ids``. With ``config.dynamics_inputs="executed"`` the dynamics
        head has its own pass over the first ``dynamics_rows`` share of the rows (all of them with
        ``logits=True``), reading ``executed_ids`` (B, L; ``ids`` if absent) with every action
        token an input.
        """
        batch = dict(batch)  # the embedding's positions (a pooled timestep numbers tokens per group)
        for prefix in ("", "goal_") if goal else ("",):
            batch[f"{prefix}local_positions"] = self.input_positions(batch[f"{prefix}types"], batch[f"{prefix}local_positions"])  # fmt: skip
        x = self.embed(batch["ids"], batch["types"], batch["local_positions"], batch.get("patches"),
                       batch.get("patch_positions"), batch.get("patch_mask"))  # fmt: skip
        if self.training and self.masked_action is not None and self.config.action_input_dropout < 1.0:
            # action tokens as inputs only: drop some, so copying the previous action does not pay
            drop = (batch["types"] == int(TokenType.ACTION)) & (
                torch.rand(batch["types"].shape, device=x.device) < self.config.action_input_dropout
            )
            local = batch["local_positions"].clamp(max=self.config.max_local_positions - 1)
            x = torch.where(drop[..., None], self.masked_action + self.local(local), x)
        n_goal, fold = 0, None
        if goal:
            g = self.embed(batch["goal_ids"], batch["goal_types"], batch["goal_local_positions"],
                           batch.get("goal_patches"), batch.get("goal_patch_positions"), batch.get("goal_patch_mask"))  # fmt: skip
            g = g + self.goal_segment
            if self.config.goal_placement != "prefix":  # the goal joins every timestep's fold
                fold = GoalFold(self.pool.goal_fold(g, batch["goal_types"], batch["goal_attention_mask"]))
                if self.goal_offset is not None:  # and each value meets its goal value
                    fold = GoalFold(fold.sum, *self.goal_values(
                        batch["goal_ids"], batch["goal_types"], batch["goal_local_positions"], batch["goal_attention_mask"]))  # fmt: skip
                    x = self.offset_goal(x, batch["ids"], batch["types"], batch["local_positions"], fold)
            else:
                x = torch.cat([g, x], dim=1)
                n_goal = g.shape[1]
        types, timesteps, valid = batch["types"], batch["timesteps"], batch["attention_mask"]
        keys = self.pool_keys(batch["ids"], types, batch["local_positions"])
        if fold is not None and fold.values is not None:
            keys = None  # the offsets make equal tokens embed apart
        if goal and fold is None:  # the goal is a segment before the first timestep
            goal_keys = self.pool_keys(batch["goal_ids"], batch["goal_types"], batch["goal_local_positions"], 1)  # fmt: skip
            if keys is not None and goal_keys is not None:
                keys = torch.cat([goal_keys, keys], dim=1)
            types = torch.cat([batch["goal_types"], types], dim=1)
            timesteps = torch.cat([torch.full_like(batch["goal_types"], -1), timesteps], dim=1)
            valid = torch.cat([batch["goal_attention_mask"], valid], dim=1)
        x, predicts = self.trunk(x, types, timesteps, valid, keys, None if fold is None else fold.sum)
        h = self.ln_f(x)
        out: dict[str, Tensor] = {"hidden": h}
        if goal:
            episode, predicts = h[:, n_goal:], predicts[:, n_goal:]
            out["goal_loss"] = self._next_token_loss(
                episode, "goal", batch["ids"], action_targets(batch), predicts
            )
            out["loss"] = self.config.goal_weight * out["goal_loss"]
            if logits:
                out["goal_logits"] = self.head_logits(episode, "goal")
            return out
        out["policy_loss"] = self._next_token_loss(h, "policy", batch["ids"], batch["loss_mask"], predicts)
        if self.config.dynamics_inputs == "executed":  # its own pass, the executed actions as inputs
            rows = len(h) if logits else max(1, math.ceil(len(h) * self.config.dynamics_rows))
            part = {
                k: v[:rows] if torch.is_tensor(v) and v.shape[:1] == h.shape[:1] else v
                for k, v in batch.items()
            }
            inputs = part.get("executed_ids", part["ids"])
            xd = self.embed(inputs, part["types"], part["local_positions"], part.get("patches"),
                            part.get("patch_positions"), part.get("patch_mask"), show_actions=True)  # fmt: skip
            keys_d = self.pool_keys(inputs, part["types"], part["local_positions"])
            xd, predicts_d = self.trunk(xd, part["types"], part["timesteps"], part["attention_mask"], keys_d)
            hd = self.ln_f(xd)
            out["dynamics_loss"] = self._dynamics_loss(hd, part, predicts_d)
        else:
            hd = h
            out["dynamics_loss"] = self._dynamics_loss(h, batch, predicts)
        out["loss"] = (
            self.config.policy_weight * out["policy_loss"]
            + self.config.dynamics_weight * out["dynamics_loss"]
        )
        if logits:
            out["policy_logits"] = self.head_logits(h, "policy")
            out["dynamics_logits"] = self.head_logits(hd, "dynamics")
        return out

    def _dynamics_loss(self, h: Tensor, batch: dict[str, Any], predicts: Tensor) -> Tensor:
        """The dynamics head's loss from hidden states ``(B, L, D)`` of ``batch``'s rows: the next
        timestep's observation tokens (``dynamics_ids`` with ``dynamics_target="delta"``; a batch
        without them is scored on its discrete observations only), never in a prompt."""
        dynamics_mask = (
            ((batch["types"] == int(TokenType.CONTINUOUS)) | (batch["types"] == int(TokenType.DISCRETE)))
            & (batch["timesteps"] > 0)
            & batch["attention_mask"]
            & ~batch.get("prompt_mask", torch.zeros_like(batch["attention_mask"]))
        )
        dynamics_ids = batch["ids"]
        if self.config.dynamics_target == "delta":
            if "dynamics_ids" in batch:
                dynamics_ids = batch["dynamics_ids"]
                dynamics_mask = dynamics_mask & (dynamics_ids >= 0)  # -1: no target (loader.NO_TARGET)
            else:  # a hand-made batch (e.g. for logits only): no change targets, discrete ones only
                dynamics_mask = dynamics_mask & (batch["types"] != int(TokenType.CONTINUOUS))
        if not self.config.dynamics_on_discrete:  # rows of bodies with discrete actions: no targets
            low, high = self.discrete_range
            actions = batch["types"] == int(TokenType.ACTION)
            discrete = (actions & (batch["ids"] >= low) & (batch["ids"] < high)).any(1)  # (B,)
            dynamics_mask = dynamics_mask & ~discrete[:, None]
        if self.config.backbone == "pooled":
            return self._readout_dynamics_loss(h, batch, dynamics_ids, dynamics_mask, predicts)
        return self._next_token_loss(h, "dynamics", dynamics_ids, dynamics_mask, predicts)

    def _readout_dynamics_loss(
        self, h: Tensor, batch: dict[str, Any], ids: Tensor, target_mask: Tensor, predicts: Tensor
    ) -> Tensor:
        """A pooled timestep's dynamics loss: every value of timestep t is predicted at once from
        the hidden state of timestep t-1's last action token plus the embedding of the value's
        position in its group (``batch["local_positions"]``, as :meth:`input_positions` numbers
        them), through the dynamics head; the folded value tokens make no predictions of their own.

        Args:
            h: ``(B, L, D)`` hidden states aligned with the tokens; ``ids``, ``target_mask``,
                ``predicts``: ``(B, L)``.
        """
        timesteps = batch["timesteps"]
        starts = torch.ones_like(target_mask)
        starts[:, 1:] = timesteps[:, 1:] != timesteps[:, :-1]
        before = run_firsts(starts) - 1  # (B, L): the last token of the timestep before
        mask = target_mask & (before >= 0) & predicts.gather(1, before.clamp(min=0))
        if not bool(mask.any()):
            return h.sum() * 0.0
        cap = self.config.dynamics_max_targets
        if cap and self.training and int(mask.sum()) > cap:  # a uniform subset: the mean stays unbiased
            where = mask.reshape(-1).nonzero().squeeze(1)
            keep = where[torch.randperm(len(where), device=where.device)[:cap]]
            mask = torch.zeros_like(mask).reshape(-1).index_fill_(0, keep, True).view_as(mask)
        readout = h.gather(1, before.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))[mask]  # (N, D)
        logits = self.readout_logits(readout, batch["local_positions"][mask]).float()  # (N, V)
        return self.token_losses(logits, ids[mask], 1.0, self.config.dynamics_sigma_bins)

    def trunk(
        self,
        x: Tensor,
        types: Tensor,
        timesteps: Tensor,
        valid: Tensor,
        keys: Tensor | None = None,
        fold: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Backbone over embedded tokens ``(B, L, D)``: hidden states ``(B, L, D)`` aligned with the
        input, and ``(B, L)`` True where a position makes a prediction (every valid token for the
        decoder; only separator and action tokens for the Perceiver, whose observation tokens are
        folded into latents). ``keys``, ``fold``: the pooled fold's (:class:`TimestepPool`), optional."""
        if self.config.backbone != "decoder":
            sequence, sequence_valid, back = self.perceive(x, types, timesteps, valid, keys, fold)
            h = self._blocks(sequence, sequence_valid)
            out = torch.gather(h, 1, back.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))
            return out * (back >= 0)[..., None], back >= 0
        return self._blocks(x, valid), valid

    def _blocks(self, x: Tensor, valid: Tensor) -> Tensor:
        b, length, _ = x.shape
        positions = torch.arange(length, device=x.device).expand(b, length)
        # right padding needs no mask under causal attention; anything else gets an explicit one
        right_padded = bool((valid.long().diff(dim=1) <= 0).all())
        mask = None
        if not right_padded:
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = causal[None] & valid[:, None, :]
            mask = (mask | ~mask.any(-1, keepdim=True))[:, None]
        tables = rope_tables(positions, self.config.head_dim, x.dtype)
        for block in self.blocks:
            x = block(x, tables, mask=mask)
        return x

    def perceive(
        self,
        x: Tensor,
        types: Tensor,
        timesteps: Tensor,
        valid: Tensor,
        keys: Tensor | None = None,
        fold: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Perceiver or pooled input: each timestep's observation tokens folded into K tokens
        (Perceiver: cross-attended into K latents; pooled: one per group, K = 3, empty groups
        dropped), then the timestep's separator and action tokens, timesteps in order.

        Args:
            x: ``(B, L, D)`` token embeddings; ``types``, ``timesteps``, ``valid``: ``(B, L)``.

        Returns:
            sequence ``(B, S, D)`` and its validity ``(B, S)`` (valid entries first), and for every
            input token its index in the sequence (``-1`` for observation tokens and padding).
        """
        b, length, d = x.shape
        pooled = self.config.backbone == "pooled"
        k = POOLED_GROUPS if pooled else self.config.perceiver_latents
        action_like = (types == int(TokenType.SEPARATOR)) | (types == int(TokenType.ACTION))
        observation = valid & ~action_like
        step = (timesteps - timesteps.masked_fill(~valid, 1 << 30).min(dim=1, keepdim=True).values).clamp(
            min=0
        )
        steps = int(step.masked_fill(~valid, 0).max()) + 1
        query_step = torch.arange(steps, device=x.device).repeat_interleave(k)  # (T*K,)
        if pooled:
            slot = step * k + token_groups(types).clamp(max=k - 1)
            latents, latent_valid = self.pool(x, slot, observation, steps * k, keys, fold)
        else:
            cross_mask = observation[:, None, :] & (
                step[:, None, :] == query_step[None, :, None]
            )  # (B, T*K, L)
            latent_valid = cross_mask.any(-1)
            queries = self.latents.repeat(steps, 1).expand(b, -1, -1)
            latents = self.cross(
                queries, x, cross_mask | ~latent_valid[..., None]
            )  # empty rows: finite, unused
        token_valid = valid & action_like
        big = (steps + 1) * (k + length)
        latent_key = (query_step * (k + length) + torch.arange(k, device=x.device).repeat(steps)).expand(
            b, -1
        )
        token_key = step * (k + length) + k + torch.arange(length, device=x.device)
        keys = torch.cat(
            [latent_key.masked_fill(~latent_valid, big), token_key.masked_fill(~token_valid, big)], dim=1
        )
        order = keys.argsort(dim=1, stable=True)
        features = torch.gather(torch.cat([latents, x], dim=1), 1, order[..., None].expand(-1, -1, d))
        sequence_valid = torch.gather(torch.cat([latent_valid, token_valid], dim=1), 1, order)
        width = max(int(sequence_valid.sum(1).max()), 1)
        inverse = order.argsort(dim=1)[:, steps * k :]  # position of every input token in the sequence
        back = inverse.masked_fill(~token_valid, -1)
        return features[:, :width], sequence_valid[:, :width], back

    def _next_token_loss(
        self, h: Tensor, head: str, ids: Tensor, target_mask: Tensor, predicts: Tensor
    ) -> Tensor:
        """Mean cross-entropy of predicting ``ids[:, t]`` from position ``t - 1``, where ``target_mask[:, t]``
        and position ``t - 1`` makes predictions; logits are computed at those positions only."""
        mask = target_mask[:, 1:] & predicts[:, :-1]
        if not bool(mask.any()):
            return h.sum() * 0.0
        logits = self.head_logits(h[:, :-1][mask], head).float()  # (N, V)
        if head == "dynamics":  # its own HL-Gauss width (None: the actions')
            return self.token_losses(logits, ids[:, 1:][mask], 1.0, self.config.dynamics_sigma_bins)
        return self.token_losses(logits, ids[:, 1:][mask], self.config.text_weight)

    def token_losses(
        self, logits: Tensor, targets: Tensor, text_weight: float = 1.0, sigma: float | None = None
    ) -> Tensor:
        """Weighted mean loss of ``logits`` (N, V) against target ids ``targets`` (N,).

        Continuous-bin targets are HL-Gauss distributions over the continuous bins when ``sigma``
        (default ``config.target_sigma_bins``) > 0 (one-hot otherwise); text targets weigh
        ``text_weight`` relative to the others."""
        log_probs = logits.log_softmax(-1)
        losses = -log_probs.gather(1, targets[:, None])[:, 0]  # (N,) one-hot cross-entropy
        sigma = self.config.target_sigma_bins if sigma is None else sigma
        low, high = self.continuous_range
        continuous = (targets >= low) & (targets < high)
        if sigma > 0 and bool(continuous.any()):
            smooth = hl_gauss_targets(targets[continuous] - low, high - low, sigma)
            losses = losses.clone()
            losses[continuous] = -(smooth * log_probs[continuous, low:high]).sum(-1)
        weights = torch.where(targets < self.text_size, text_weight, 1.0)
        return (losses * weights).sum() / weights.sum().clamp(min=1e-12)

    # -- acting --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        x: Tensor,
        valid: Tensor,
        cache: KVCache,
        head: str = "policy",
        vocab: tuple[int, int] | None = None,
        last: Tensor | None = None,
    ) -> Tensor:
        """Feed new token embeddings through the cache; logits of each row's last new token.

        Args:
            x: ``(B, n, D)`` embeddings of the new tokens (right-padded per row).
            valid: ``(B, n)`` bool, a prefix of True per row.
            cache: the rows' cache; ``lengths`` advance by each row's valid count.
            head: ``policy``, ``dynamics`` or ``goal``; ``hidden``: the final hidden states
                ``(B, D)`` (``(B, max(last), D)`` with ``last``) instead of logits (a pooled
                timestep's dynamics readout adds each value's position to them).
            vocab: only the logits of ids ``[low, high)`` (acting needs an action's id range only).
            last: ``(B,)`` read the logits of each row's ``last[b]`` final valid tokens instead.

        Returns:
            ``(B, V)`` logits at each row's last valid new token (``(B, high - low)`` with ``vocab``);
            with ``last``, ``(B, max(last), V)``: entry ``[b, i]`` after new token
            ``valid count - last[b] + i`` (rows with fewer than ``max(last)`` hold meaningless ones).
        """
        b, n, _ = x.shape
        counts = valid.sum(1)
        if bool((cache.lengths + counts > cache.capacity).any()):
            raise ValueError("KV cache full: re-encode a shorter window of whole timesteps into a new cache")
        offsets = torch.arange(n, device=x.device)
        write_at = (cache.lengths[:, None] + offsets).clamp(max=cache.capacity - 1)  # (B, n)
        positions = cache.lengths[:, None] + offsets
        upto = int((cache.lengths + counts).max())  # attend over the filled part of the cache only
        keys = torch.arange(upto, device=x.device)
        limit = cache.lengths[:, None] + offsets  # query i sees keys <= its own slot
        mask = (keys[None, None, :] <= limit[:, :, None]) & (
            keys[None, None, :] < (cache.lengths + counts)[:, None, None]
        )
        tables = rope_tables(positions, self.config.head_dim, x.dtype)
        for layer, block in enumerate(self.blocks):
            cached = (cache.k[layer], cache.v[layer])
            x = block(x, tables, mask=mask[:, None], cache=cached, write_at=write_at, upto=upto)
        cache.lengths += counts
        if last is not None:
            reads = (counts - last)[:, None] + torch.arange(int(last.max()), device=x.device)  # (B, M)
            h = x.gather(1, reads.clamp(0, n - 1)[..., None].expand(-1, -1, x.shape[-1]))
            return self.ln_f(h) if head == "hidden" else self.head_logits(self.ln_f(h), head, vocab)
        final = self.ln_f(x[torch.arange(b, device=x.device), (counts - 1).clamp(min=0)])  # (B, D)
        return final if head == "hidden" else self.head_logits(final, head, vocab)

    def readout_logits(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """A pooled timestep's dynamics readout (as trained in :meth:`_readout_dynamics_loss`):
        logits ``(n, V)`` of the next timestep's values at group ``positions`` ``(n,)``, from the
        final hidden state ``(D,)`` (or one per position, ``(n, D)``) of the last action token
        before them. With ``dynamics_readout="mlp"`` the sum of hidden state and position
        embedding first goes through its own MLP (residual), so each position can read a
        different function of the state."""
        local = positions.clamp(max=self.config.max_local_positions - 1)
        z = hidden + self.local(local)  # (n, D): one hidden state broadcasts over the positions
        if self.readout_mlp is not None:
            z = z + self.readout_mlp(z)
        return self.head_logits(z, "dynamics")

    def backbone_inputs(
        self, x: Tensor, types: Tensor, timesteps: Tensor, fold: Tensor | None = None
    ) -> Tensor:
        """What one row of tokens ``(1, L, D)`` feeds the backbone when acting: the embeddings
        themselves (decoder), or the Perceiver's latents and action-side tokens; ``fold``
        ``(1, groups, D)``: a goal placed in every timestep (:meth:`TimestepPool.goal_fold`)."""
        if self.config.backbone == "decoder":
            return x
        valid = torch.ones_like(types, dtype=torch.bool)
        sequence, sequence_valid, _ = self.perceive(x, types, timesteps, valid, fold=fold)
        return sequence[:, : int(sequence_valid.sum())]

    def head_logits(self, h: Tensor, head: str, vocab: tuple[int, int] | None = None) -> Tensor:
        """Logits of one head from final hidden states ``(..., D)``: ``(..., V)``, or over ids
        ``[low, high)`` only with ``vocab``."""
        weight = self.tokens.weight if vocab is None else self.tokens.weight[vocab[0] : vocab[1]]
        if head == "policy":
            return h @ weight.T
        adapter = {"dynamics": self.dynamics_adapter, "goal": self.goal_adapter}.get(head)
        if adapter is None:
            raise ValueError(f"head: expected 'policy', 'dynamics' or 'goal', got {head!r}")
        return (h + adapter(h)) @ weight.T


def action_targets(batch: dict[str, Any]) -> Tensor:
    """``(B, L)`` True at the action tokens the policy and goal heads are trained on: valid, and
    not in a prompt."""
    return (
        (batch["types"] == int(TokenType.ACTION))
        & batch["attention_mask"]
        & ~batch.get("prompt_mask", torch.zeros_like(batch["attention_mask"]))
    )
