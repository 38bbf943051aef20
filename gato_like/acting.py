"""The acting core: KV-cache rows for many episodes, fed and decoded in batches.

Both the runtime agent (:class:`gato_like.policy.Policy`) and the policy server
(:mod:`gato_like.serving.engine`) act through one :class:`ActingCore`; neither re-implements it.

::

    allocate() ─► Row (one row of the shared cache)      release(row): the last row moves into it
    reset([(row, spec, prompt, goal)])                    the prefix (goal, prompt) is fed once
    act([(row, observation)])                             one step for every row at once:
        tokenize + embed every observation (one patch-encoder call for all images)
        roll full windows (prefix + newest whole timesteps, re-encoded: a cache is never shifted)
        one forward pass for every row's new tokens, then one per action token, per head
        decode each row's action token in its embodiment's id range (greedy or sampled)

Rows may hold any mix of embodiments; rows acting with another head (goal-conditioned) take their
own passes in the same call. Rows of live episodes are kept contiguous, so a pass runs on a view
of the span of rows it needs. Used by one thread at a time.

The cache has one spare position past the context (``capacity = context_length + 1``): a row that
takes no tokens in a forward pass is still written past its length, and the spare slot keeps that
write off a full row's last entry.
"""

from __future__ import annotations

import collections
import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gato_like.model import GatoModel, GoalFold, KVCache
from gato_like.tokenizers import EmbodimentSpec, SequenceBuilder, TextTokenizer, TokenSequence, TokenType
from gato_like.tokenizers.vocab import bin_centres, bin_of

Prompt = tuple[Mapping[str, Any], np.ndarray]


@dataclass
class Row:
    """One episode's row of the core's cache and its token history."""

    index: int = -1
    """Row of the cache (-1: released)."""
    spec: EmbodimentSpec | None = None
    builder: SequenceBuilder | None = None
    head: str = "policy"
    """``policy``, or ``goal`` when the episode was reset with a goal."""
    prefix: Tensor | None = None
    """``(1, p, D)`` backbone inputs of the goal and prompt, kept on roll-over."""
    steps: list[Tensor] = field(default_factory=list)
    """``(1, n_t, D)`` backbone inputs of every finished timestep in the window."""
    length: int = 0
    """Tokens in this row of the cache."""
    pending: Tensor | None = None
    """``(1, 1, D)``: the last action token of the newest timestep (already in ``steps``), not yet
    in the cache: nothing needs its logits, so it is fed with the next observation (one forward
    pass a step fewer; with ``history_steps`` windows it is re-encoded with its timestep anyway)."""
    fold: GoalFold | None = None
    """The goal joined to every timestep's fold (``goal_placement`` ``timestep`` or ``relative``),
    else None."""
    temperature: float = 0.0
    """0: the config's decoding (greedy bins, or ``discrete_decoding``); > 0: sample every action
    token from ``softmax(logits / temperature)``."""
    generator: torch.Generator = field(default_factory=torch.Generator)
    """Sampled actions' generator (CPU), seeded at every reset."""


@dataclass
class _Group:
    """One head's requests of an :meth:`ActingCore.act` call, tokenized, embedded and accepted."""

    order: list[int]  # row indices, ascending
    rows: dict[int, Row]
    index: dict[int, int]  # row index -> position in the call's requests
    built: dict[int, TokenSequence]
    steps: dict[int, Tensor]  # (1, n, D) backbone inputs of the new observation


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS where the C library can (glibc's ``malloc_trim``):
    after a large cache shrinks, glibc would otherwise keep the pages for later allocations."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def episode_seed(seed: int, episode: int) -> int:
    """The sampler's seed for the ``episode``-th reset of a policy (or server session) seeded ``seed``."""
    return seed * 1_000_003 + episode


class ActingCore:
    """KV-cache rows for many episodes of one model, and the batched acting loop.

    Args:
        model: the trained model (put in eval mode).
        text: the checkpoint's text tokenizer (every builder's vocabulary).
        device: where the model runs.
        rows: cache rows to allocate up front (the cache doubles when full).
    """

    def __init__(self, model: GatoModel, text: TextTokenizer, device: str | torch.device = "cpu", rows: int = 1) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.text = text
        self.device = torch.device(device)
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Row] = []
        shape = (max(rows, 1), self.config.n_head, self.config.context_length + 1, self.config.head_dim)
        self.cache = KVCache(
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.config.n_layer)],
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.config.n_layer)],
            torch.zeros(shape[0], dtype=torch.long, device=self.device),
        )
        self._builders: dict[str, SequenceBuilder] = {}
        self._min_rows = max(rows, 1)
        self.last_logits: dict[int, list[Tensor]] = {}
        """Per row index, the logits each action token of the last :meth:`act` was chosen from:
        ``(1, n)`` over the ids ``last_vocab[row index]``."""
        self.last_vocab: dict[int, tuple[int, int]] = {}
        """Per row index, the id range ``[low, high)`` of its :attr:`last_logits` (every action id
        of the rows that acted with it in one pass)."""

    def builder(self, spec: EmbodimentSpec) -> SequenceBuilder:
        """The sequence builder of an embodiment (one per spec name, reused)."""
        builder = self._builders.get(spec.name)
        if builder is None or builder.spec != spec:
            builder = self._builders[spec.name] = SequenceBuilder(spec, self.text)
        return builder

    # -- rows ----------------------------------------------------------------------------------

    def allocate(self) -> Row:
        """A new row, empty (the cache grows by doubling when full)."""
        capacity = self.cache.k[0].shape[0]
        if len(self.rows) == capacity:
            self.cache.k = [torch.cat([k, torch.zeros_like(k)]) for k in self.cache.k]
            self.cache.v = [torch.cat([v, torch.zeros_like(v)]) for v in self.cache.v]
            self.cache.lengths = torch.cat([self.cache.lengths, torch.zeros_like(self.cache.lengths)])
        row = Row(index=len(self.rows))
        self.rows.append(row)
        self.cache.lengths[row.index] = 0
        return row

    def release(self, row: Row) -> None:
        """Free a row; the last row moves into its place so live rows stay contiguous. When a
        quarter of the cache's rows or fewer are live, the cache halves (never below the rows it
        started with), so a burst of sessions does not hold its memory for good."""
        if row.index < 0 or row.index >= len(self.rows) or self.rows[row.index] is not row:
            return
        last = self.rows.pop()
        if last is not row:
            for k, v in zip(self.cache.k, self.cache.v, strict=True):
                k[row.index] = k[last.index]
                v[row.index] = v[last.index]
            self.cache.lengths[row.index] = self.cache.lengths[last.index]
            self.cache.lengths[last.index] = 0
            last.index = row.index
            self.rows[row.index] = last
        else:
            self.cache.lengths[row.index] = 0
        row.index = -1
        capacity = self.cache.k[0].shape[0]
        if capacity > self._min_rows and len(self.rows) <= capacity // 4:  # give memory back
            keep = max(capacity // 2, self._min_rows)
            self.cache.k = [k[:keep].clone() for k in self.cache.k]
            self.cache.v = [v[:keep].clone() for v in self.cache.v]
            self.cache.lengths = self.cache.lengths[:keep].clone()
            _trim_heap()

    # -- embedding -----------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, tokens: TokenSequence, goal: bool = False, fold: GoalFold | None = None) -> Tensor:
        """Backbone inputs ``(1, n, D)`` of a token sequence (``goal``: as the goal segment;
        ``fold``: a goal joined to every timestep, :meth:`goal_fold`)."""
        return self.embed_many([tokens], goal, [fold])[0]

    @torch.inference_mode()
    def embed_many(
        self,
        sequences: Sequence[TokenSequence],
        goal: bool = False,
        folds: Sequence[GoalFold | None] | None = None,
        raw: bool = False,
    ) -> list[Tensor]:
        """Backbone inputs ``(1, n_i, D)`` of several token sequences, embedded in one call (one
        patch-encoder pass over every image patch of them all); ``folds``: per sequence, a goal
        joined to every timestep's fold or None; ``raw``: the token embeddings instead."""
        if not sequences:
            return []
        width = max(max(len(s) for s in sequences), 1)
        patches = max(len(s.patches) for s in sequences)
        n = len(sequences)
        ids = np.zeros((n, width), np.int64)
        types = np.full((n, width), int(TokenType.PAD), np.int64)
        local = np.zeros((n, width), np.int64)
        timesteps = np.zeros((n, width), np.int64)
        first = sequences[0]
        patch_array = (
            np.zeros((n, patches, *first.patches.shape[1:]), first.patches.dtype) if patches else None
        )
        patch_positions = np.zeros((n, patches, *first.patch_positions.shape[1:]), first.patch_positions.dtype) if patches else None  # fmt: skip
        patch_mask = np.zeros((n, patches), bool)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], types[i, : len(s)] = s.ids, s.types
            local[i, : len(s)], timesteps[i, : len(s)] = s.local_positions, s.timesteps
            if patches and len(s.patches):
                assert patch_array is not None and patch_positions is not None
                patch_array[i, : len(s.patches)] = s.patches
                patch_positions[i, : len(s.patches)] = s.patch_positions
                patch_mask[i, : len(s.patches)] = True

        def t(a: np.ndarray | None) -> Tensor | None:
            return None if a is None else torch.from_numpy(a).to(self.device)

        types_t, local_t = t(types), t(local)
        assert types_t is not None and local_t is not None
        local_t = self.model.input_positions(types_t, local_t)
        x = self.model.embed(t(ids), types_t, local_t, t(patch_array), t(patch_positions), t(patch_mask))  # type: ignore[arg-type]
        if goal:
            x = x + self.model.goal_segment
        if raw:
            return [x[i : i + 1, : len(s)] for i, s in enumerate(sequences)]
        out = []
        for i, s in enumerate(sequences):
            row_types = types_t[i : i + 1, : len(s)]
            fold = folds[i] if folds is not None else None
            row = x[i : i + 1, : len(s)]
            if fold is not None:  # goal_placement "relative": each value meets its goal value
                row = self.model.offset_goal(row, t(ids[i : i + 1, : len(s)]), row_types, local_t[i : i + 1, : len(s)], fold)  # type: ignore[arg-type]  # fmt: skip
            out.append(self.model.backbone_inputs(row, row_types, t(timesteps[i : i + 1, : len(s)]), None if fold is None else fold.sum))  # type: ignore[arg-type]  # fmt: skip
        return out

    @staticmethod
    def goal_tokens(builder: SequenceBuilder, goal: Mapping[str, Any]) -> TokenSequence:
        """A goal observation's tokens: one timestep's, without the separator."""
        tokens = builder.build_step(goal)
        keep = tokens.types != TokenType.SEPARATOR
        return TokenSequence(tokens.ids[keep], tokens.types[keep], tokens.timesteps[keep],
                             tokens.local_positions[keep], tokens.loss_mask[keep], tokens.patches,
                             tokens.patch_positions)  # fmt: skip

    @torch.inference_mode()
    def goal_fold(self, builder: SequenceBuilder, goal: Mapping[str, Any] | None) -> GoalFold | None:
        """The goal's share of every timestep's fold under ``goal_placement`` ``timestep`` or
        ``relative`` (batch 1, as the training pass computes it), else None."""
        if goal is None or self.config.goal_placement == "prefix":
            return None
        tokens = self.goal_tokens(builder, goal)
        x = self.embed_many([tokens], goal=True, raw=True)[0]
        types = torch.from_numpy(tokens.types.astype(np.int64))[None].to(self.device)
        valid = torch.ones_like(types, dtype=torch.bool)
        fold = GoalFold(self.model.pool.goal_fold(x, types, valid))
        if self.config.goal_placement == "relative":
            ids = torch.from_numpy(tokens.ids.astype(np.int64))[None].to(self.device)
            local = torch.from_numpy(tokens.local_positions.astype(np.int64))[None].to(self.device)
            local = self.model.input_positions(types, local)
            fold = GoalFold(fold.sum, *self.model.goal_values(ids, types, local, valid))
        return fold

    @torch.inference_mode()
    def encode_prefix(self, builder: SequenceBuilder, prompt: Prompt | None = None, goal: Mapping[str, Any] | None = None) -> Tensor:  # fmt: skip
        """Backbone inputs ``(1, p, D)`` of a goal (without separators, as the goal segment) followed
        by a prompt demonstration; ``p`` is 0 without either. Raises ``ValueError`` when ``p`` is more
        than half the context."""
        return self._encode_prefix(builder, prompt, goal, self.goal_fold(builder, goal))

    @torch.inference_mode()
    def _encode_prefix(
        self,
        builder: SequenceBuilder,
        prompt: Prompt | None,
        goal: Mapping[str, Any] | None,
        fold: GoalFold | None,
    ) -> Tensor:
        """:meth:`encode_prefix` given the goal's :meth:`goal_fold` (which ``reset`` keeps too)."""
        parts = []
        if goal is not None and fold is None:
            parts.append(self.embed(self.goal_tokens(builder, goal), goal=True))
        if prompt is not None:
            observations, actions = prompt
            parts.append(self.embed(builder.build(observations, actions), fold=fold))
        prefix = (
            torch.cat(parts, dim=1)
            if parts
            else torch.zeros(1, 0, self.config.n_embd, device=self.device, dtype=self.dtype)
        )
        if prefix.shape[1] > self.config.context_length // 2:
            raise ValueError(
                f"reset: prompt and goal take {prefix.shape[1]} tokens; at most half the context "
                f"({self.config.context_length // 2}) is allowed"
            )
        return prefix

    # -- episodes ------------------------------------------------------------------------------

    @torch.inference_mode()
    def reset(
        self,
        items: Sequence[tuple[Row, EmbodimentSpec, Prompt | None, Mapping[str, Any] | None]],
        seeds: Sequence[int] | None = None,
        temperature: float | Sequence[float] = 0.0,
    ) -> list[Exception | None]:
        """Start new episodes: ``(row, spec, prompt or None, goal or None)`` each, the rows'
        generators seeded with ``seeds`` (default 0). Returns per item None, or the error
        (``ValueError``/``TypeError``) that left that row unchanged."""
        temperatures = [float(temperature)] * len(items) if isinstance(temperature, (int, float)) else list(temperature)  # fmt: skip
        errors: list[Exception | None] = []
        chunks: dict[int, Tensor] = {}
        for i, (row, spec, prompt, goal) in enumerate(items):
            if not self.live(row):
                errors.append(ValueError("reset: the row was released"))
                continue
            try:
                builder = self.builder(spec)
                problem = self.model.position_problem(spec.name, builder.group_sizes())
                if problem is not None:
                    raise ValueError(f"reset: {problem}")
                fold = self.goal_fold(builder, goal)
                prefix = self._encode_prefix(builder, prompt, goal, fold)
            except (ValueError, TypeError) as error:
                errors.append(error)
                continue
            errors.append(None)
            row.spec, row.builder, row.prefix = spec, builder, prefix
            row.fold = fold
            row.head = "goal" if goal is not None else "policy"
            row.steps, row.length, row.pending = [], 0, None
            row.temperature = temperatures[i]
            row.generator.manual_seed(seeds[i] if seeds is not None else 0)
            self.cache.lengths[row.index] = 0
            if prefix.shape[1]:
                chunks[row.index] = prefix
        if chunks:
            self.feed(chunks, "policy")
        return errors

    @torch.inference_mode()
    def act(self, requests: Sequence[tuple[Row, Mapping[str, Any]]], atomic: bool = False, checked: bool = False) -> list[np.ndarray | Exception]:  # fmt: skip
        """Actions for one observation per row (each row at most once): one forward pass for
        every row's new observation tokens, then one per action token; rows acting with
        different heads take separate passes. A request that cannot be acted on (an observation
        that does not tokenize, a timestep that does not fit the context, a released row) gets
        its error (``ValueError``/``TypeError``/``RuntimeError``) in its place, and its row is
        left unchanged. ``atomic``: when any request is refused, no row acts (the others get
        ``RuntimeError("not acted: ...")``). ``checked``: every observation was already checked
        against its row's spec (the server's engine checks before queueing); not again."""
        pending = ValueError("not acted")
        out: list[np.ndarray | Exception] = [pending] * len(requests)
        by_head: dict[str, list[int]] = collections.defaultdict(list)
        for i, (row, _) in enumerate(requests):
            if row.builder is None or not self.live(row):
                out[i] = RuntimeError("act: the row was never reset, or was released")
                continue
            by_head[row.head].append(i)
        self.last_logits, self.last_vocab = {}, {}
        groups = [(head, self._prepare([(i, *requests[i]) for i in members], out, checked)) for head, members in by_head.items()]  # fmt: skip
        refused = [o for o in out if isinstance(o, Exception) and o is not pending]
        if atomic and refused:
            return [RuntimeError(f"not acted: another request failed: {refused[0]}") if o is pending else o for o in out]  # fmt: skip
        for head, group in groups:
            if group is not None:
                self._act_group(head, group, out)
        return out

    def live(self, row: Row) -> bool:
        """Whether ``row`` holds a row of this core's cache (not released)."""
        return 0 <= row.index < len(self.rows) and self.rows[row.index] is row

    def _prepare(self, group: list[tuple[int, Row, Mapping[str, Any]]], out: list[np.ndarray | Exception], checked: bool = False) -> _Group | None:  # fmt: skip
        """Tokenize and embed one head's observations and refuse what cannot act, changing no row."""
        built: dict[int, TokenSequence] = {}
        rows: dict[int, Row] = {}
        index: dict[int, int] = {}
        for i, row, observation in group:
            assert row.builder is not None
            try:
                built[row.index] = row.builder.build_step(observation, checked)
            except (ValueError, TypeError) as error:
                out[i] = error
                continue
            rows[row.index], index[row.index] = row, i
        order = sorted(rows)
        embedded = self.embed_many([built[r] for r in order], folds=[rows[r].fold for r in order])
        steps = dict(zip(order, embedded, strict=True))
        for r in list(order):
            row = rows[r]
            assert row.builder is not None and row.prefix is not None
            need = steps[r].shape[1] + row.builder.action_size
            if row.prefix.shape[1] + need > self.config.context_length:  # not even after a roll
                out[index[r]] = ValueError(
                    f"one timestep ({need} tokens after a prompt and goal of {row.prefix.shape[1]}) "
                    f"does not fit the context ({self.config.context_length})"
                )
                order.remove(r)
        return _Group(order, rows, index, built, steps) if order else None

    def _act_group(self, head: str, group: _Group, out: list[np.ndarray | Exception]) -> None:
        order, rows, index, built, steps = group.order, group.rows, group.index, group.built, group.steps
        # roll full windows: the prefix and the newest whole timesteps (at most half the context),
        # re-encoded in the same forward pass as the new observation
        chunks: dict[int, Tensor] = {}
        for r in order:
            row = rows[r]
            assert row.builder is not None
            history = self.config.history_for(row.builder.spec.action.kind)
            need = steps[r].shape[1] + row.builder.action_size
            pending = row.pending if row.pending is not None else steps[r][:, :0]
            chunks[r] = torch.cat([pending, steps[r]], dim=1)
            row.pending = None
            if row.length + pending.shape[1] + need > self.config.context_length or (
                history and len(row.steps) >= history
            ):  # the window's last timestep holds the pending action tokens
                window = self._keep_window(row, self.config.context_length - need)
                chunks[r] = torch.cat([window, steps[r]], dim=1)
        ranges = [rows[r].builder.action_id_range() for r in order]  # type: ignore[union-attr]
        vocab = (min(low for low, _ in ranges), max(high for _, high in ranges))  # logits of action ids only
        sizes = [rows[r].builder.action_size for r in order]  # type: ignore[union-attr]
        # the first action's local position follows the separator's, as the model numbers them
        # (the layout's count of observation tokens, or 1 in a pooled timestep), not the backbone
        # input count (the Perceiver and pooled timesteps fold observation tokens)
        local = torch.tensor([self.action_position(built[r]) for r in order], device=self.device)
        self.last_logits |= {r: [] for r in order}
        self.last_vocab |= dict.fromkeys(order, vocab)
        if self.model.masked_action is not None and self.config.action_input_dropout >= 1.0:
            self._act_masked(head, group, out, chunks, vocab, local)
            return
        chosen: list[list[int]] = [[] for _ in order]
        lo, logits = self.feed(chunks, head, vocab)
        select = torch.tensor([r - lo for r in order], device=self.device)
        logits = logits[select]  # (R, V) in the order of `order`
        active = list(range(len(order)))
        for j in range(max(sizes)):
            active = [k for k in active if j < sizes[k]]
            for k in active:
                self.last_logits[order[k]].append(logits[k : k + 1])
            picked = self._pick([rows[order[k]] for k in active], logits[active], vocab[0])  # (a,)
            tokens = self.model.embed(
                picked[:, None],
                torch.full_like(picked[:, None], int(TokenType.ACTION)),
                (local[active] + j)[:, None],
            )  # (a, 1, D)
            feed, more = {}, []
            for n, k in enumerate(active):
                chosen[k].append(int(picked[n]))
                steps[order[k]] = torch.cat([steps[order[k]], tokens[n : n + 1]], dim=1)
                if j + 1 < sizes[k]:
                    feed[order[k]] = tokens[n : n + 1]
                    more.append(k)
                else:  # a row's last action token: no logits needed, fed with its next observation
                    rows[order[k]].pending = tokens[n : n + 1]
            if feed:
                lo_j, logits_j = self.feed(feed, head, vocab)
                logits = logits.clone()
                logits[more] = logits_j[torch.tensor([order[k] - lo_j for k in more], device=self.device)]
        for k, r in enumerate(order):
            row = rows[r]
            assert row.builder is not None
            row.steps.append(steps[r])
            out[index[r]] = row.builder.decode_actions(np.asarray([chosen[k]], dtype=np.int64))[0]

    def _act_masked(self, head: str, group: _Group, out: list[np.ndarray | Exception], chunks: dict[int, Tensor], vocab: tuple[int, int], local: Tensor) -> None:  # fmt: skip
        """Every action token of every row from one forward pass, when action tokens are never
        inputs (``action_input_dropout`` 1: each is the mask embedding at its position, whatever
        was chosen): the masked tokens of actions 0..n-2 follow the observation in the same pass,
        and the logits after the separator and after each of them decide actions 0..n-1. The
        cache ends as the token-by-token loop leaves it (the last action token pending)."""
        order, rows, index, steps = group.order, group.rows, group.index, group.steps
        sizes = [rows[r].builder.action_size for r in order]  # type: ignore[union-attr]
        actions: dict[int, Tensor] = {}
        for k, r in enumerate(order):
            positions = (local[k] + torch.arange(sizes[k], device=self.device))[None]  # (1, n)
            ids = torch.zeros_like(positions)  # masked: the id does not reach the embedding
            actions[r] = self.model.embed(ids, torch.full_like(ids, int(TokenType.ACTION)), positions)
            chunks[r] = torch.cat([chunks[r], actions[r][:, : sizes[k] - 1]], dim=1)
        lo, logits = self.feed(chunks, head, vocab, last={r: sizes[k] for k, r in enumerate(order)})
        logits = logits[torch.tensor([r - lo for r in order], device=self.device)]  # (R, M, V)
        chosen: list[list[int]] = [[] for _ in order]
        for j in range(max(sizes)):  # in token order, so each row's sampler draws as the loop would
            active = [k for k in range(len(order)) if j < sizes[k]]
            for k in active:
                self.last_logits[order[k]].append(logits[k : k + 1, j])
            picked = self._pick([rows[order[k]] for k in active], logits[active, j], vocab[0])
            for n, k in enumerate(active):
                chosen[k].append(int(picked[n]))
        for k, r in enumerate(order):
            row = rows[r]
            assert row.builder is not None
            row.steps.append(torch.cat([steps[r], actions[r]], dim=1))
            row.pending = actions[r][:, -1:]
            out[index[r]] = row.builder.decode_actions(np.asarray([chosen[k]], dtype=np.int64))[0]

    def action_position(self, tokens: TokenSequence) -> int:
        """The local position the model reads for the first action token after ``tokens`` (one
        timestep's observation and separator): the separator's, plus one. A pooled timestep
        numbers the separator 0 in its group (``group_positions``); the other backbones read the
        layout's own position (the tests check both against a full forward pass)."""
        if self.config.backbone == "pooled":
            return 1
        return int(tokens.local_positions[-1]) + 1

    def _pick(self, rows: list[Row], logits: Tensor, offset: int = 0) -> Tensor:
        """The chosen action ids ``(R,)`` from logits ``(R, n)`` of ids ``[offset, offset + n)``, each
        row in its embodiment's id range; greedy rows of one range are decoded together, sampled
        rows with their own generator."""
        picked = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple[int, int, str], list[int]] = collections.defaultdict(list)
        for k, row in enumerate(rows):
            assert row.builder is not None and row.spec is not None
            low, high = row.builder.action_id_range()
            low, high = low - offset, high - offset
            if row.temperature > 0:  # the row's own temperature samples every action token
                picked[k] = sample_bin(logits[k : k + 1, low:high], row.temperature, row.generator)[0] + low
            else:
                groups[(low, high, row.spec.action.kind)].append(k)
        for (low, high, kind), members in groups.items():  # the config's decoding
            part = logits[members, low:high].float()
            if kind == "discrete" and self.config.discrete_decoding == "sample":  # each its own draws
                for m, one in zip(members, part, strict=True):
                    picked[m] = pick_action(one[None], self.config, kind, rows[m].generator)[0] + low
            else:
                picked[members] = pick_action(part, self.config, kind, rows[members[0]].generator) + low
        return picked + offset

    # -- the cache -----------------------------------------------------------------------------

    def feed(self, chunks: Mapping[int, Tensor], head: str, vocab: tuple[int, int] | None = None, last: Mapping[int, int] | None = None) -> tuple[int, Tensor]:  # fmt: skip
        """Append ``chunks[row index]`` (1, n, D) to those rows in one forward pass over the span of
        rows they cover. Returns ``(first row of the span, logits (span, V))`` (of ids ``vocab =
        [low, high)`` only, when given); a row of the span without a chunk gets meaningless logits.
        ``last``: per row, read the logits after its chunk's last that many tokens instead:
        ``(span, max(last), V)`` (see :meth:`GatoModel.step`)."""
        lo, hi = min(chunks), max(chunks) + 1
        width = max(max(c.shape[1] for c in chunks.values()), 1)
        first = next(iter(chunks.values()))
        x = torch.zeros(hi - lo, width, self.config.n_embd, device=self.device, dtype=first.dtype)
        valid = torch.zeros(hi - lo, width, dtype=torch.bool, device=self.device)
        for r, chunk in chunks.items():
            n = chunk.shape[1]
            x[r - lo, :n], valid[r - lo, :n] = chunk[0], True
            self.rows[r].length += n
        view = KVCache(
            [k[lo:hi] for k in self.cache.k], [v[lo:hi] for v in self.cache.v], self.cache.lengths[lo:hi]
        )
        reads = None
        if last is not None:
            reads = torch.ones(hi - lo, dtype=torch.long, device=self.device)
            for r, m in last.items():
                reads[r - lo] = m
        return lo, self.model.step(x, valid, view, head=head, vocab=vocab, last=reads)

    def refill(self, row: Row, steps: Sequence[Tensor], head: str | None = None) -> Tensor | None:
        """Empty the row's cache and feed it its prefix followed by ``steps`` ((1, n, D) each).
        Returns the logits ``(V,)`` after the last token (None when there is nothing to feed)."""
        assert row.prefix is not None
        self.cache.lengths[row.index] = 0
        row.length, row.pending = 0, None
        window = torch.cat([row.prefix, *steps], dim=1)
        if not window.shape[1]:
            return None
        lo, logits = self.feed({row.index: window}, head or row.head)
        return logits[row.index - lo]

    def _keep_window(self, row: Row, room: int) -> Tensor:
        """Keep the prefix and the newest whole timesteps (at most half the context, at most
        ``room`` tokens with the prefix, and fewer than the body's history); empty the row's cache.
        Returns the window to re-encode ``(1, w, D)``."""
        assert row.prefix is not None
        assert row.builder is not None
        budget = min(self.config.context_length // 2, room) - row.prefix.shape[1]
        history = self.config.history_for(row.builder.spec.action.kind)
        kept: list[Tensor] = []
        for step in reversed(row.steps):
            if sum(s.shape[1] for s in kept) + step.shape[1] > budget or (
                history and len(kept) >= history - 1
            ):
                break
            kept.insert(0, step)
        row.steps, row.length, row.pending = kept, 0, None
        self.cache.lengths[row.index] = 0
        return torch.cat([row.prefix, *kept], dim=1)

    def save(self, row: Row) -> tuple[list[Tensor], list[Tensor], int, int, Tensor | None]:
        """A copy of one row's cache (see :meth:`restore`)."""
        i = row.index
        return [k[i].clone() for k in self.cache.k], [v[i].clone() for v in self.cache.v], int(self.cache.lengths[i]), row.length, row.pending  # fmt: skip

    def restore(self, row: Row, saved: tuple[list[Tensor], list[Tensor], int, int, Tensor | None]) -> None:
        """Put back a row's cache saved by :meth:`save`."""
        i = row.index
        for k, kept in zip(self.cache.k, saved[0], strict=True):
            k[i] = kept
        for v, kept in zip(self.cache.v, saved[1], strict=True):
            v[i] = kept
        self.cache.lengths[i], row.length, row.pending = saved[2], saved[3], saved[4]

    def flush(self, row: Row) -> None:
        """Feed the row's pending action token into its cache (before reading the cache as a whole
        history, e.g. for an open-loop rollout)."""
        if row.pending is not None:
            pending, row.pending = row.pending, None
            self.feed({row.index: pending}, row.head, (0, 0))


def sample_bin(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A sample ``(N,)`` from ``softmax(logits / temperature)`` over ``(N, n)``, drawn on the CPU
    with ``generator`` (so it is the same on any device)."""
    probs = torch.softmax(logits.float() / temperature, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def pick_bin(logits: Tensor, decoding: str) -> Tensor:
    """The bin ``(N,)`` chosen from logits over ordered bins ``(N, bins)``: ``argmax``, or the bin
    holding the distribution's ``mean`` (bin centres of the vocabulary's uniform bins) or ``median``."""
    bins = logits.shape[-1]
    if decoding == "argmax":
        return logits.argmax(-1)
    probs = torch.softmax(logits.double(), -1)
    if decoding == "median":
        return ((probs.cumsum(-1) < 0.5).sum(-1)).clamp(max=bins - 1)
    if decoding != "mean":
        raise ValueError(f"decoding: expected 'argmax', 'mean' or 'median', got {decoding!r}")
    centres = torch.from_numpy(bin_centres(bins)).to(logits.device)
    mean = (probs * centres).sum(-1)
    return torch.from_numpy(bin_of(mean.cpu().numpy(), bins)).to(logits.device)


def pick_action(logits: Tensor, config: Any, kind: str, generator: torch.Generator) -> Tensor:
    """The action token ``(N,)`` (offset within its range) from logits over that range ``(N, n)``,
    as the config decodes: continuous bins by ``action_decoding``, discrete choices by
    ``discrete_decoding`` (sampled at temperature 1 with ``generator``, or argmax)."""
    if kind == "continuous":
        return pick_bin(logits, getattr(config, "action_decoding", "argmax"))
    if getattr(config, "discrete_decoding", "argmax") == "sample":
        return sample_bin(logits, 1.0, generator)
    return logits.argmax(-1)
