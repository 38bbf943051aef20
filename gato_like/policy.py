"""The runtime agent: ``Policy.from_checkpoint(path)``, ``reset(...)``, ``act(observation)``.

Each environment keeps its token history and its rows of a shared KV cache, so acting for one
more timestep feeds only that timestep's tokens. When the context is full, the oldest whole
timesteps are dropped (the prompt and goal stay) and the kept window is re-encoded once; acting
then continues from the cache. Observations are checked against the embodiment spec first; the
error names the key, the expected and the received value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gato_like.checkpoint import Checkpoint, load_checkpoint
from gato_like.model import KVCache
from gato_like.tokenizers import EmbodimentSpec, SequenceBuilder, SpecMismatchError, TokenSequence, TokenType


@dataclass
class _Env:
    prefix: Tensor  # (1, p, D) prompt and goal embeddings, kept on roll-over
    steps: list[Tensor] = field(default_factory=list)  # (1, n_t, D) per finished timestep
    length: int = 0  # tokens in this row of the cache


class Policy:
    """Acts for one or many environments of one embodiment with a trained model.

    Args:
        checkpoint: a loaded checkpoint.
        device: where the model runs.
        temperature: 0 picks the most likely action token; > 0 samples.
        seed: seed of the sampler.
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", temperature: float = 0.0, seed: int = 0) -> None:  # fmt: skip
        self.checkpoint = checkpoint
        self.model = checkpoint.model.to(device).eval()
        self.device = torch.device(device)
        self.temperature = float(temperature)
        self.seed = seed
        self.episodes = 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        """Sampled actions' generator, seeded at every :meth:`reset` from ``seed`` and the count
        of resets so far (:func:`episode_seed`): reproducible, and each episode its own draws."""
        self.spec: EmbodimentSpec | None = None
        self.builder: SequenceBuilder | None = None
        self.envs: list[_Env] = []
        self.cache: KVCache | None = None
        self.head = "policy"
        self.last_logits: list[Tensor] = []
        """The logits ``(N, V)`` each action token of the last :meth:`act_batch` was chosen from."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Policy:
        return cls(load_checkpoint(path, device), device, **kwargs)

    # -- episodes ------------------------------------------------------------------------------

    def reset(
        self,
        task: str | None = None,
        prompt: tuple[Mapping[str, Any], np.ndarray] | None = None,
        goal: Mapping[str, Any] | None = None,
        num_envs: int = 1,
        embodiment: str | None = None,
    ) -> EmbodimentSpec:
        """Start new episodes.

        Args:
            task: a task (or embodiment) name the checkpoint knows.
            prompt: a demonstration ``(observations {key: (T, ...)}, actions (T, ...))`` to condition on.
            goal: a goal observation ``{key: array}`` (one timestep); acting then uses the goal head.
            num_envs: environments acted for together by :meth:`act_batch`.
            embodiment: the embodiment name, when no task is given.

        Returns:
            The embodiment spec observations must follow.
        """
        name = task or embodiment
        if name is None:
            if len(self.checkpoint.specs) != 1:
                raise ValueError(f"reset: name a task or embodiment (known: {sorted(self.checkpoint.specs)})")
            name = next(iter(self.checkpoint.specs))
        self.spec = self.checkpoint.spec_for(name)
        self.generator.manual_seed(episode_seed(self.seed, self.episodes))
        self.episodes += 1
        self.builder = SequenceBuilder(self.spec, self.checkpoint.text)
        prefix = self.encode_prefix(self.builder, prompt, goal)
        self.head = "goal" if goal is not None else "policy"
        self.envs = [_Env(prefix) for _ in range(num_envs)]
        self.cache = KVCache.empty(self.model.config, num_envs, self.device, prefix.dtype)
        if prefix.shape[1]:
            self._feed([prefix] * num_envs)
        return self.spec

    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action for one environment's observation ``{key: array}`` (shape ``action.shape``)."""
        if self.builder is None:
            raise RuntimeError("act: call reset() first")
        if len(self.envs) != 1:
            raise ValueError(f"act: {len(self.envs)} environments were reset; use act_batch")
        return self.act_batch([observation])[0]

    @torch.no_grad()
    def act_batch(self, observations: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Actions for every environment, in one forward pass per action token."""
        if self.builder is None or self.cache is None or self.spec is None:
            raise RuntimeError("act: call reset() first")
        if len(observations) != len(self.envs):
            raise ValueError(
                f"act_batch: expected {len(self.envs)} observations (one per env), got {len(observations)}"
            )
        builder, config = self.builder, self.model.config
        tokens_in = [builder.build_step(o) for o in observations]
        steps = [self._embed(t) for t in tokens_in]  # each (1, n_i, D): backbone inputs
        need = [s.shape[1] + builder.action_size for s in steps]
        history = getattr(config, "history_steps", 0)
        for i, env in enumerate(self.envs):
            if env.length + need[i] > config.context_length or (history and len(env.steps) >= history):
                self._roll(i, need[i])
        logits = self._feed(steps)
        low, high = self._action_range()
        chosen: list[list[int]] = [[] for _ in self.envs]
        # the first action's local position is the observation's token count (separator included),
        # not its backbone input count (the Perceiver folds observation tokens into latents)
        local = torch.tensor([len(t) for t in tokens_in], device=self.device)
        self.last_logits = []
        for j in range(builder.action_size):
            self.last_logits.append(logits)
            ids = self._pick(logits, low, high)  # (N,)
            for i, value in enumerate(ids.tolist()):
                chosen[i].append(value)
            tokens = self.model.embed(
                ids[:, None],
                torch.full_like(ids[:, None], int(TokenType.ACTION)),
                (local + j)[:, None],
            )
            logits = self._feed([tokens[i : i + 1] for i in range(len(self.envs))])
            for i in range(len(self.envs)):
                steps[i] = torch.cat([steps[i], tokens[i : i + 1]], dim=1)
        for env, step in zip(self.envs, steps, strict=True):
            env.steps.append(step)
        actions = builder.decode_actions(np.asarray(chosen, dtype=np.int64))
        return [actions[i] for i in range(len(self.envs))]

    @torch.no_grad()
    def rollout(
        self, observation: Mapping[str, Any], actions: np.ndarray, decode: str = "median"
    ) -> list[dict[str, np.ndarray]]:
        """Open-loop dynamics: predicted observations after each of ``actions`` (k, *action.shape),
        starting from the current history and ``observation``; the policy's own state is untouched.

        With ``Config.dynamics_inputs="executed"`` the head reads ``actions`` as inputs (as it
        was trained to: the actions executed), else as the policy's masked inputs.
        With ``Config.dynamics_target="delta"`` the head predicts each proprio value's change: the
        prediction is the previous value plus the decoded change (kept in float; its bin is fed
        back). ``decode``: a continuous value is the median bin of the head's distribution over the 1024
        bins (``median``, the default: robust to the long tails of an uncertain head, where the
        most likely bin can sit far out), its mean in mu-law space (``mean``) or its most likely
        bin (``argmax``); that bin is fed back. Discrete values are always the most likely one.

        Proprioceptive and discrete keys are predicted by the dynamics head; text and images are
        carried over from ``observation`` (the model does not generate pixels). Decoder backbone only.
        With ``Config.history_steps`` the context keeps the newest that many timesteps at every
        step (prompt and goal stay), as in training and in :meth:`act`.

        Returns:
            k dicts ``{key: array}`` of the predicted proprio/discrete observations.
        """
        if self.builder is None or self.cache is None or self.spec is None:
            raise RuntimeError("rollout: call reset() first")
        if self.model.config.backbone != "decoder":
            raise NotImplementedError(
                "rollout: the dynamics head predicts observation tokens with the decoder backbone only"
            )
        if len(self.envs) != 1:
            raise ValueError("rollout: reset with num_envs=1")
        builder, spec = self.builder, self.spec
        actions = np.asarray(actions)
        problems = spec.action.violations(actions, (len(actions),))
        if problems:
            raise SpecMismatchError(spec.name, problems, what="rollout actions")
        template = builder.build_step(observation)
        per_step = len(template) + builder.action_size
        if per_step * (len(actions) + 1) > self.model.config.context_length - self.envs[0].length:
            raise ValueError(f"rollout: {len(actions)} steps do not fit in the remaining context; use fewer")
        saved = (self.cache, self.envs[0].length)
        self.cache = KVCache(
            [k.clone() for k in saved[0].k], [v.clone() for v in saved[0].v], saved[0].lengths.clone()
        )
        layout = builder.layout
        generated = (template.types == TokenType.CONTINUOUS) | (template.types == TokenType.DISCRETE)
        ranges = {
            int(TokenType.CONTINUOUS): (layout.continuous_offset, layout.discrete_offset),
            int(TokenType.DISCRETE): (layout.discrete_offset, layout.separator_id),
        }
        delta = self.model.config.dynamics_target == "delta"
        continuous_at = np.flatnonzero(template.types == TokenType.CONTINUOUS)
        # the proprio values in token order; with delta targets the head's changes add up on them
        values = np.concatenate(
            [np.asarray(observation[k], np.float64).reshape(-1) for k in builder.tensor_keys
             if spec.observations[k].kind == "proprio"] or [np.zeros(0)]
        )  # fmt: skip
        history = self.model.config.history_steps
        done = list(self.envs[0].steps)  # whole timesteps (1, n, D) before the current one
        current = self._embed(template)  # the current timestep's observation and separator
        try:
            if not history:
                self._feed([current])
            predictions = []
            for action in actions:
                if history:  # as trained and as act() keeps it: the newest history_steps timesteps
                    self._refill(0, [*(done[len(done) - (history - 2) :] if history > 2 else []), current])
                action_ids = torch.from_numpy(builder.encode_actions(action[None])[0])[None]
                local = torch.arange(len(template), len(template) + builder.action_size)[None]
                tokens = self.model.embed(
                    action_ids,
                    torch.full_like(action_ids, int(TokenType.ACTION)),
                    local,
                    show_actions=self.model.config.dynamics_inputs == "executed",
                )
                logits = self._feed([tokens], head="dynamics")
                ids = template.ids.copy()
                position, last = 0, len(template) - 1  # the last template token is the separator
                while position < last:
                    end = position + 1
                    if generated[position]:
                        low, high = ranges[int(template.types[position])]
                        ids[position] = (
                            self._predicted_bin(logits[0, low:high], int(template.types[position]), decode)
                            + low
                        )
                        if delta and template.types[position] == TokenType.CONTINUOUS:
                            j = int(np.searchsorted(continuous_at, position))
                            values[j] += float(builder.continuous.decode(ids[position : position + 1])[0])
                            ids[position] = int(builder.continuous.encode(values[j : j + 1])[0])
                    else:  # a run of carried-over text or image tokens
                        while end < last and not generated[end]:
                            end += 1
                    logits = self._feed([self._embed(_part(template, ids, position, end))], head="dynamics")
                    position = end
                self._feed([self._embed(_part(template, ids, last, last + 1))])
                if history:
                    done.append(torch.cat([current, tokens], dim=1))
                    current = self._embed(_part(template, ids, 0, last + 1))
                predictions.append(self._decode_observation(ids, template, values if delta else None))
            return predictions
        finally:
            self.cache, self.envs[0].length = saved

    def predict(
        self, observation: Mapping[str, Any], action: np.ndarray, decode: str = "median"
    ) -> dict[str, np.ndarray]:
        """The next observation's proprio/discrete keys after ``action`` (see :meth:`rollout`)."""
        return self.rollout(observation, np.asarray(action)[None], decode)[0]

    @staticmethod
    def _predicted_bin(logits: Tensor, token_type: int, decode: str) -> int:
        """The bin (offset inside its id range) the dynamics head predicts from ``logits`` (n,)."""
        if decode not in ("median", "mean", "argmax"):
            raise ValueError(f"decode: expected 'median', 'mean' or 'argmax', got {decode!r}")
        if decode == "argmax" or token_type != int(TokenType.CONTINUOUS):
            return int(logits.argmax())
        bins = logits.shape[-1]
        if decode == "median":
            cumulative = torch.softmax(logits.double(), -1).cumsum(-1)
            return min(int((cumulative < 0.5).sum()), bins - 1)
        centres = -1.0 + (2.0 * torch.arange(bins, dtype=torch.float64, device=logits.device) + 1.0) / bins
        mean = float((torch.softmax(logits.double(), -1) * centres).sum())
        return min(int((mean + 1.0) / 2.0 * bins), bins - 1)

    # -- building blocks (also used by the serving engine) ---------------------------------------

    @torch.no_grad()
    def encode_prefix(
        self,
        builder: SequenceBuilder,
        prompt: tuple[Mapping[str, Any], np.ndarray] | None = None,
        goal: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Backbone inputs ``(1, p, D)`` of a goal (without separators, as the goal segment) followed
        by a prompt demonstration; ``p`` is 0 without either. Raises ``ValueError`` when ``p`` is more
        than half the context."""
        parts = []
        if goal is not None:
            tokens = builder.build_step(goal)
            keep = tokens.types != TokenType.SEPARATOR
            goal_tokens = TokenSequence(tokens.ids[keep], tokens.types[keep], tokens.timesteps[keep],
                                        tokens.local_positions[keep], tokens.loss_mask[keep], tokens.patches,
                                        tokens.patch_positions)  # fmt: skip
            parts.append(self._embed(goal_tokens, goal=True))
        if prompt is not None:
            observations, actions = prompt
            parts.append(self._embed(builder.build(observations, actions)))
        prefix = (
            torch.cat(parts, dim=1)
            if parts
            else torch.zeros(1, 0, self.model.config.n_embd, device=self.device)
        )
        if prefix.shape[1] > self.model.config.context_length // 2:
            raise ValueError(
                f"reset: prompt and goal take {prefix.shape[1]} tokens; at most half the context "
                f"({self.model.config.context_length // 2}) is allowed"
            )
        return prefix

    @torch.no_grad()
    def embed_tokens(self, tokens: TokenSequence, goal: bool = False) -> Tensor:
        """Backbone inputs ``(1, n, D)`` of a token sequence (``goal``: as the goal segment)."""
        return self._embed(tokens, goal)

    # -- internals -----------------------------------------------------------------------------

    def _decode_observation(
        self, ids: np.ndarray, template: TokenSequence, proprio: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Predicted proprio/discrete keys from the ids of one generated observation; ``proprio``
        (the proprio values in token order, float) replaces the proprio tokens' bin centres."""
        assert self.builder is not None and self.spec is not None
        builder, out = self.builder, {}
        tensors = (template.types == TokenType.CONTINUOUS) | (template.types == TokenType.DISCRETE)
        values = ids[tensors]
        at, at_proprio = 0, 0
        for key in builder.tensor_keys:
            obs = self.spec.observations[key]
            n = int(np.prod(obs.shape))
            chunk = values[at : at + n]
            if obs.kind == "proprio":
                decoded = (
                    builder.continuous.decode(chunk)
                    if proprio is None
                    else proprio[at_proprio : at_proprio + n]
                )
                out[key] = np.asarray(decoded, np.float32).reshape(obs.shape)
                at_proprio += n
            else:
                out[key] = builder.discrete.decode(chunk).reshape(obs.shape)
            at += n
        return out

    def _embed(self, tokens: TokenSequence, goal: bool = False) -> Tensor:
        """Backbone inputs ``(1, n, D)`` of a token sequence (``goal``: as the goal segment)."""

        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)[None]

        types = t(tokens.types).long()
        x = self.model.embed(t(tokens.ids), types, t(tokens.local_positions).long(), t(tokens.patches), t(tokens.patch_positions), None)  # fmt: skip
        if goal:
            x = x + self.model.goal_segment
        return self.model.backbone_inputs(x, types, t(tokens.timesteps).long())

    def _feed(self, chunks: list[Tensor], rows: list[int] | None = None, head: str | None = None) -> Tensor:
        """Append ``chunks[i]`` (1, n_i, D) to env i's cache row (only ``rows`` if given); (N, V) logits."""
        assert self.cache is not None
        rows = list(range(len(self.envs))) if rows is None else rows
        width = max((chunks[i].shape[1] for i in rows), default=0)
        x = torch.zeros(len(self.envs), max(width, 1), self.model.config.n_embd, device=self.device, dtype=chunks[rows[0]].dtype)  # fmt: skip
        valid = torch.zeros(len(self.envs), max(width, 1), dtype=torch.bool, device=self.device)
        for i in rows:
            n = chunks[i].shape[1]
            x[i, :n], valid[i, :n] = chunks[i][0], True
            self.envs[i].length += n
        return self.model.step(x, valid, self.cache, head=head or self.head)

    def _refill(self, row: int, steps: list[Tensor]) -> None:
        """Empty cache row ``row`` and feed it its prefix followed by ``steps`` ((1, n, D) each)."""
        assert self.cache is not None
        env = self.envs[row]
        self.cache.lengths[row] = 0
        env.length = 0
        window = torch.cat([env.prefix, *steps], dim=1)
        if window.shape[1]:
            chunks = [window if i == row else window[:, :0] for i in range(len(self.envs))]
            self._feed(chunks, rows=[row])

    def _roll(self, row: int, need: int) -> None:
        """Keep the prefix and the newest whole timesteps (at most half the context); re-encode them."""
        assert self.cache is not None
        env, config = self.envs[row], self.model.config
        budget = config.context_length // 2 - env.prefix.shape[1]
        kept: list[Tensor] = []
        history = getattr(config, "history_steps", 0)
        for step in reversed(env.steps):
            if sum(s.shape[1] for s in kept) + step.shape[1] > budget or (
                history and len(kept) >= history - 1
            ):
                break
            kept.insert(0, step)
        env.steps = kept
        self._refill(row, kept)
        if env.length + need > config.context_length:
            raise ValueError(
                f"one timestep ({need} tokens) does not fit the context ({config.context_length})"
            )

    def _action_range(self) -> tuple[int, int]:
        assert self.builder is not None and self.spec is not None
        layout = self.builder.layout
        if self.spec.action.kind == "continuous":
            return layout.continuous_offset, layout.continuous_offset + layout.continuous_bins
        assert self.spec.action.num_choices is not None
        return layout.discrete_offset, layout.discrete_offset + self.spec.action.num_choices

    def _pick(self, logits: Tensor, low: int, high: int) -> Tensor:
        allowed = logits[:, low:high].float()
        if self.temperature > 0:  # the caller's temperature samples every action
            return sample_bin(allowed, self.temperature, self.generator) + low
        assert self.spec is not None
        return pick_action(allowed, self.model.config, self.spec.action.kind, self.generator) + low


def episode_seed(seed: int, episode: int) -> int:
    """The sampler's seed for the ``episode``-th reset of a policy (or server session) seeded ``seed``."""
    return seed * 1_000_003 + episode


def pick_action(logits: Tensor, config: Any, kind: str, generator: torch.Generator) -> Tensor:
    """The action token ``(N,)`` (offset within its range) from logits over that range ``(N, n)``,
    as the config decodes: continuous bins by ``action_decoding``, discrete choices by
    ``discrete_decoding`` (sampled at temperature 1 with ``generator``, or argmax)."""
    if kind == "continuous":
        return pick_bin(logits, getattr(config, "action_decoding", "argmax"))
    if getattr(config, "discrete_decoding", "argmax") == "sample":
        return sample_bin(logits, 1.0, generator)
    return logits.argmax(-1)


def sample_bin(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A sample ``(N,)`` from ``softmax(logits / temperature)`` over ``(N, n)``, drawn on the CPU
    with ``generator`` (so it is the same on any device)."""
    probs = torch.softmax(logits.float() / temperature, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def pick_bin(logits: Tensor, decoding: str) -> Tensor:
    """The bin ``(N,)`` chosen from logits over ordered bins ``(N, bins)``: ``argmax``, or the bin
    holding the distribution's ``mean`` (bin centres in [-1, 1]) or ``median``."""
    bins = logits.shape[-1]
    if decoding == "argmax":
        return logits.argmax(-1)
    probs = torch.softmax(logits.double(), -1)
    if decoding == "median":
        return ((probs.cumsum(-1) < 0.5).sum(-1)).clamp(max=bins - 1)
    if decoding != "mean":
        raise ValueError(f"decoding: expected 'argmax', 'mean' or 'median', got {decoding!r}")
    centres = -1.0 + (2.0 * torch.arange(bins, dtype=torch.float64, device=logits.device) + 1.0) / bins
    mean = (probs * centres).sum(-1)
    return ((mean + 1.0) / 2.0 * bins).long().clamp(0, bins - 1)


def _part(template: TokenSequence, ids: np.ndarray, start: int, end: int) -> TokenSequence:
    """Positions ``[start, end)`` of one timestep's tokens, with ``ids`` in place of its ids."""
    image = template.types == TokenType.IMAGE
    patches = slice(int(image[:start].sum()), int(image[:end].sum()))
    return TokenSequence(
        ids[start:end], template.types[start:end], template.timesteps[start:end],
        template.local_positions[start:end], template.loss_mask[start:end],
        template.patches[patches], template.patch_positions[patches],
    )  # fmt: skip
