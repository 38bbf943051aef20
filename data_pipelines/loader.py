"""Streaming training data: shards -> episodes -> windows of whole timesteps -> padded batches.

::

    per task:  shard URLs --(resampled, seeded by rank and worker | or split by node and worker)-->
               tar samples --shuffle(buffer)--> Episode (checked against the task's spec)
    mix:       tasks drawn with the domain weights (a seeded draw, see _mix)
    window:    tokenize (SequenceBuilder), cut a random window of whole timesteps to the context,
               with probability 0.25 prepend a prompt from another episode of the same task
               (half from its end, goal-like; half a uniform window), and attach a hindsight goal
               (the observation of a later timestep of the same episode)
    collate:   pad to the longest sequence in the batch (PAD id, attention mask), pad patches

Works on a local dataset folder or any URL webdataset opens (``https://``, ``gs://``, ``pipe:``...;
``s3://`` through ``pipe:aws s3 cp ... -``): the index is read with fsspec when installed, else
urllib, and the shard URLs are the index's paths under that root.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gato_like.data_pipelines.episodes import Episode, EpisodeFormatError
from gato_like.data_pipelines.shards import INDEX_FILE, DatasetError, check_index, read_index
from gato_like.timestep import history_of, sequence_cost, timestep_cost
from gato_like.tokenizers import EmbodimentSpec, SequenceBuilder, TextTokenizer, TokenSequence, TokenType
from gato_like.tokenizers.spec import SpecMismatchError

#: Recent prompt candidates per task: (episode key, its candidate prompts).
Pools = dict[str, deque[tuple[str, list[TokenSequence]]]]


@dataclass
class LoaderConfig:
    """How sequences are cut and mixed."""

    context_length: int = 1024
    """Backbone inputs per sequence (prompt included): tokens for Gato's ``decoder``; for the
    folding backbones each timestep costs what :func:`gato_like.timestep.timestep_cost` says, so
    a window holds the timesteps the model attends over when it acts."""
    backbone: str = "decoder"
    """The model's ``backbone``: how a timestep's cost is counted."""
    perceiver_latents: int = 0
    """The model's ``perceiver_latents`` (the ``perceiver`` backbone's cost of an observation)."""
    prompt_probability: float = 0.25
    """Share of sequences that get a prompt from another episode of the same task (Gato: 25 %)."""
    prompt_max_fraction: float = 0.5
    """Largest share of the context a prompt may take."""
    shuffle_buffer: int = 8
    """Episodes held per task for sample shuffling (a 1000-step 64x64 episode is ~12 MB decoded)."""
    window_shuffle_buffer: int = 64
    """Windows held for shuffling (several windows are cut from each decoded episode)."""
    prompt_pool: int = 8
    """Recent episodes per task kept as prompt sources."""
    domain_weights: dict[str, float] | None = None
    """Sampling weight per task (default: equal)."""
    hindsight_goals: bool = True
    """Attach the observation of a later timestep as a goal."""
    resampled: bool = True
    """Endless stream (shards resampled per rank and worker); False: one pass, shards split by node and worker."""
    history_steps: int = 0
    """The most timesteps a window holds (0: as many as fit the context); the model's ``history_steps``."""
    discrete_history_steps: int = 0
    """``history_steps`` for tasks whose actions are discrete (0: ``history_steps``); the model's own."""
    task_batches: bool = False
    """Each batch comes from one task, so short control windows are not padded to a long BabyAI
    window; the task of each batch is drawn with the domain weights (a weight is a task's share of
    the optimizer steps). The dataset then yields whole collated batches."""
    mix_tasks: bool = False
    """With ``task_batches``: a batch draws its windows from every task whose actions are of one
    kind (continuous or discrete), each task with its domain weight, instead of from one task; the
    kind of each batch is drawn with its tasks' summed weights. The weights still set each task's
    share of the windows, and control windows stay apart from BabyAI's 150-token ones."""
    batch_tokens: int = 0
    """With ``task_batches``: a batch holds at most ``batch_size`` sequences and about this many
    tokens (padding included), so a task with long timesteps (BabyAI's 150-token views) gets
    fewer sequences per batch than one with 7-token timesteps; 0: always ``batch_size``."""
    discrete_batch_tokens: int = 0
    """``batch_tokens`` for tasks whose actions are discrete (0: ``batch_tokens``), as
    ``discrete_history_steps`` is for the history: a one-timestep BabyAI window is ~150 tokens
    of which the pooled representation feeds 4 to the backbone, so its batches can hold more."""
    length_groups: float = 1.25
    """With a token budget: a batch's windows are within this factor of its first (random)
    window's length, so a batch of short windows is not padded to a prompted one (a BabyAI
    window is ~157 tokens, ~314 with a prompt: a third of a mixed batch was padding). Every
    window is still used once, in a different order; 0: windows in buffer order, any length."""
    on_error: str = "raise"
    """``raise`` on a corrupt shard or sample, or ``skip`` it with a warning."""
    seed: int = 0


@dataclass
class DatasetSource:
    """Where a dataset lives: its index and the URL of each task's shards."""

    root: str
    index: dict[str, Any]
    specs: dict[str, EmbodimentSpec] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, tasks: list[str] | None = None) -> DatasetSource:
        root = str(root).rstrip("/")
        if "://" in root:
            index = check_index(json.loads(_read_url(f"{root}/{INDEX_FILE}")), f"{root}/{INDEX_FILE}")
            specs = {
                t: EmbodimentSpec.from_json(_read_url(f"{root}/{e['spec']}"))
                for t, e in index["tasks"].items()
            }
        else:
            index = read_index(root)
            specs = {t: EmbodimentSpec.from_file(Path(root) / e["spec"]) for t, e in index["tasks"].items()}
        if tasks:
            missing = [t for t in tasks if t not in index["tasks"]]
            if missing:
                raise DatasetError(f"{root}: no task(s) {missing}; the dataset has {sorted(index['tasks'])}")
            index = {**index, "tasks": {t: index["tasks"][t] for t in tasks}}
            specs = {t: specs[t] for t in tasks}
        return cls(root, index, specs)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.index["tasks"])

    def shard_urls(self, task: str) -> list[str]:
        return [f"{self.root}/{shard['path']}" for shard in self.index["tasks"][task]["shards"]]


def _read_url(url: str) -> str:
    """A small text file at ``url``: http(s) with urllib, other schemes through fsspec."""
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            return str(response.read().decode())
    try:
        import fsspec
    except ImportError as error:
        scheme = url.split("://")[0]
        raise DatasetError(
            f"{url}: reading {scheme}:// needs fsspec and its backend (e.g. pip install fsspec s3fs gcsfs)"
        ) from error
    with fsspec.open(url, "r") as handle:
        return str(handle.read())


def episode_stream(source: DatasetSource, task: str, config: LoaderConfig) -> Any:
    """A webdataset pipeline of one task's episodes (checked against its spec)."""
    import webdataset as wds

    urls = source.shard_urls(task)
    spec = source.specs[task]
    handler = wds.reraise_exception if config.on_error == "raise" else wds.warn_and_continue
    if config.resampled:
        shards = [wds.ResampledShards(urls, seed=config.seed, deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]

    def decode(sample: dict[str, Any]) -> Episode:
        where = f"shard {sample.get('__url__', '?')}"
        episode = Episode.from_sample(sample, where=where)
        try:
            episode.check(spec)
        except SpecMismatchError as error:
            raise EpisodeFormatError(f"{where}: sample {sample.get('__key__')!r}: {error}") from error
        return episode

    return wds.DataPipeline(
        *shards,
        wds.tarfile_to_samples(handler=_named(handler)),
        wds.shuffle(config.shuffle_buffer, initial=min(config.shuffle_buffer, 4), seed=config.seed),
        wds.map(decode, handler=handler),
    )


def _named(handler: Any) -> Any:
    """Turn webdataset's tar errors into one that names the shard."""

    def handle(error: Exception) -> bool:
        if not isinstance(error, EpisodeFormatError):
            urls = [a for a in error.args if isinstance(a, str) and ("/" in a or "." in a)]
            shard = urls[-1] if urls else "?"
            error = EpisodeFormatError(
                f"shard {shard}: unreadable tar ({type(error).__name__}: {error.args[0]})"
            )
        return bool(handler(error))

    return handle


def check_domain_weights(weights: dict[str, float] | None, tasks: list[str]) -> None:
    """Task weights must name tasks of the dataset, be non-negative and leave one task positive
    (a task not named weighs 1); raises ``ValueError`` naming what is wrong."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"domain_weights: no task(s) {unknown} in the dataset (tasks: {tasks})")
    if any(not w >= 0 for w in weights.values()) or not any(weights.get(t, 1.0) > 0 for t in tasks):
        raise ValueError(
            f"domain_weights: expected non-negative weights, at least one positive, got {weights}"
        )


class WindowSampler:
    """Episodes of several tasks -> training sequences (numpy dicts), as described in the module doc.

    Windows are chosen in timestep units from each timestep's token count, and only the chosen
    timesteps are tokenized: the cost follows the tokens produced, not the episode's length.
    """

    def __init__(
        self, source: DatasetSource, config: LoaderConfig, text: TextTokenizer | None = None
    ) -> None:
        self.source = source
        self.config = config
        self.text = text or TextTokenizer()
        self.builders = {t: SequenceBuilder(spec, self.text) for t, spec in source.specs.items()}
        self.task_ids = {t: i for i, t in enumerate(source.tasks)}
        self._text_lengths: dict[str, int] = {}
        self._costs: dict[int, tuple[TokenSequence, int]] = {}
        if not 0.0 <= config.prompt_probability <= 1.0 or not 0.0 < config.prompt_max_fraction < 1.0:
            raise ValueError(
                "prompt_probability: expected [0, 1] and prompt_max_fraction: expected (0, 1), got "
                f"{config.prompt_probability}, {config.prompt_max_fraction}"
            )
        if config.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {config.on_error!r}")
        check_domain_weights(config.domain_weights, source.tasks)
        for task, builder in self.builders.items():
            per_step = self._step_cost(builder, 0)
            if per_step > config.context_length:
                raise ValueError(
                    f"context_length {config.context_length} is shorter than one timestep of {task} "
                    f"({per_step}+ backbone inputs); raise it or shrink the observations"
                )

    def _step_cost(self, builder: SequenceBuilder, text: int) -> int:
        sizes = builder.group_sizes()
        cfg = self.config
        return timestep_cost(cfg.backbone, cfg.perceiver_latents, text, sizes["image"], sizes["values"], sizes["action"])  # fmt: skip

    def bounds(self, episode: Episode) -> np.ndarray:
        """int64 ``(T + 1,)``: cumulative backbone inputs (tokens for the decoder) of the episode's
        timesteps; timestep t costs ``bounds[t + 1] - bounds[t]``."""
        builder = self.builders[episode.task]
        text = np.zeros(episode.length, np.int64)
        for key in builder.text_keys:
            text += [self._text_length(str(s)) for s in episode.observations[key]]
        costs = {int(n): self._step_cost(builder, int(n)) for n in np.unique(text)}
        lengths = np.array([costs[int(n)] for n in text], np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])

    def cost(self, tokens: TokenSequence) -> int:
        """Backbone inputs of a tokenized run of whole timesteps (a prompt). A prompt candidate is
        drawn for many windows, so its cost is kept (with the sequence, so its id stays its own):
        recomputing it was ~10 % of the loader's time under the ``cpu`` recipe."""
        kept = self._costs.get(id(tokens))
        if kept is not None and kept[0] is tokens:
            return kept[1]
        value = sequence_cost(self.config.backbone, self.config.perceiver_latents, tokens.types, tokens.timesteps)  # fmt: skip
        if len(self._costs) >= 4096:  # a few pools' worth of candidates
            self._costs.clear()
        self._costs[id(tokens)] = (tokens, value)
        return value

    def _text_length(self, text: str) -> int:
        if text not in self._text_lengths:
            if len(self._text_lengths) > 100_000:
                self._text_lengths.clear()
            self._text_lengths[text] = len(self.text.encode(text))
        return self._text_lengths[text]

    def _tokens(self, episode: Episode, start: int, stop: int) -> TokenSequence:
        return self._build(episode, np.arange(start, stop))

    def _build(self, episode: Episode, index: np.ndarray) -> TokenSequence:
        """Tokens of the episode's timesteps ``index`` (checked when the episode was decoded), with
        the dynamics head's change targets (each proprio value minus the timestep before's) and,
        where the episode recorded them, its executed actions (the dynamics head's inputs)."""
        builder = self.builders[episode.task]
        observations = {k: v[index] for k, v in episode.observations.items()}
        before = np.maximum(index - 1, 0)
        previous = {k: episode.observations[k][before] for k in builder.tensor_keys}
        executed = None if episode.executed_actions is None else episode.executed_actions[index]
        return builder.build(
            observations, episode.actions[index], checked=True, previous=previous, executed=executed
        )

    def history(self, task: str) -> int:
        """The most timesteps a window of ``task`` holds (0: as many as fit the context)."""
        cfg = self.config
        return history_of(cfg.history_steps, cfg.discrete_history_steps, self.source.specs[task].action.kind)

    def batch_tokens(self, task: str) -> int:
        """The token budget of a batch of ``task`` (0: no budget): ``discrete_batch_tokens`` for a
        body whose actions are discrete where it is set, else ``batch_tokens``."""
        cfg = self.config
        if cfg.discrete_batch_tokens and self.source.specs[task].action.kind == "discrete":
            return cfg.discrete_batch_tokens
        return cfg.batch_tokens

    def windows_per_episode(self, task: str, bounds: np.ndarray) -> int:
        """How many windows to cut from one decoded episode: about its tokens over the context (at
        most 8), or with ``history_steps`` one per window's worth of its timesteps (at most 64): a
        short window is cheap to tokenize, and decoding the episode again for every 8 of them took
        two thirds of the loader's time on 1000-step control episodes (a BabyAI episode of ~15
        one-timestep windows gave 3 per decode, and decoding was most of a BabyAI batch). The history is
        ``task``'s (:meth:`history`)."""
        history = self.history(task)
        if history:
            steps = len(bounds) - 1
            return int(np.clip(steps // history, 1, 64))
        return int(np.clip(bounds[-1] // self.config.context_length, 1, 8))

    def prompt_candidates(
        self, episode: Episode, bounds: np.ndarray, rng: random.Random
    ) -> list[TokenSequence]:
        """Prompts this episode can give later ones: its last timesteps (goal-like) and a uniform window."""
        return self.episode_samples(episode, bounds, rng, deque(), 0)[1]

    def sample(
        self,
        episode: Episode,
        bounds: np.ndarray,
        rng: random.Random,
        pool: deque[tuple[str, list[TokenSequence]]],
    ) -> dict[str, Any]:
        """One training sequence from ``episode``; ``pool`` holds recent prompt candidates of its task."""
        return self.episode_samples(episode, bounds, rng, pool, 1, candidates=False)[0][0]

    def plan(
        self,
        episode: Episode,
        bounds: np.ndarray,
        rng: random.Random,
        pool: deque[tuple[str, list[TokenSequence]]],
        count: int,
        candidates: bool = True,
    ) -> tuple[list[tuple[TokenSequence | None, bool]], list[tuple[int, int]], int]:
        """The random draws of :meth:`episode_samples`: per sample its prompt (or None) and whether
        a goal follows; the timestep spans to tokenize, in order (each sample's window, then its
        goal step, then the prompt candidates); and how many prompt candidates (0 or 2) end them."""
        cfg = self.config
        history = self.history(episode.task)
        longest = int(np.diff(bounds).max())
        if count and longest > cfg.context_length:
            raise ValueError(
                f"{episode.task}: a timestep of episode {episode.key!r} has {longest} tokens, more than "
                f"context_length {cfg.context_length}"
            )
        spans: list[tuple[int, int]] = []  # episode timesteps to tokenize, in order
        plans = []
        for _ in range(count):
            prompt = None
            others = [c for key, c in pool if key != episode.key and c]
            if others and rng.random() < cfg.prompt_probability:
                end, uniform = rng.choice(others)
                prompt = end if rng.random() < 0.5 else uniform
            prompt_cost = self.cost(prompt) if prompt is not None else 0
            if cfg.context_length - prompt_cost < longest:
                prompt, prompt_cost = None, 0  # the window must still hold any whole timestep
            budget = cfg.context_length - prompt_cost
            start, stop = _window_steps(bounds, budget, rng)
            if history and stop - start > history:
                start = rng.randrange(start, stop - history + 1)
                stop = start + history
            spans.append((start, stop))
            goal = None
            if cfg.hindsight_goals:
                goal = rng.randrange(stop - 1, episode.length)
                spans.append((goal, goal + 1))
            plans.append((prompt, goal is not None))
        chosen = 0
        if candidates:
            budget = int(cfg.context_length * cfg.prompt_max_fraction)
            if longest <= budget:  # else some timestep alone exceeds the prompt budget
                steps = len(bounds) - 1
                first = int(np.searchsorted(bounds, bounds[steps] - budget, side="left"))
                start, stop = _window_steps(bounds, budget, rng)
                if history:  # a prompt is no longer than the history the model attends over
                    first, stop = max(first, steps - history), min(stop, start + history)
                spans += [(first, steps), (start, stop)]
                chosen = 2
        return plans, spans, chosen

    def episode_samples(
        self,
        episode: Episode,
        bounds: np.ndarray,
        rng: random.Random,
        pool: deque[tuple[str, list[TokenSequence]]],
        count: int,
        candidates: bool = True,
    ) -> tuple[list[dict[str, Any]], list[TokenSequence]]:
        """``count`` training sequences from ``episode`` (each as :meth:`sample`), then, with
        ``candidates``, its prompt candidates (as :meth:`prompt_candidates`), the same random
        draws in the same order. Every timestep they need (windows, candidates and goals) is
        tokenized in one pass and cut apart: one call per window cost ~60 % of the loader's time."""
        plans, spans, chosen = self.plan(episode, bounds, rng, pool, count, candidates)
        if not spans:
            return [], []
        # the spans' timesteps side by side: one tokenization, then each span cut out again
        tokens = self._build(episode, np.concatenate([np.arange(a, b) for a, b in spans]))
        offsets = np.cumsum([0] + [b - a for a, b in spans])
        return self.assemble(
            episode, plans, tokens.windows([(int(a), int(b)) for a, b in itertools.pairwise(offsets)]), chosen
        )

    def assemble(
        self,
        episode: Episode,
        plans: list[tuple[TokenSequence | None, bool]],
        tokenized: list[TokenSequence],
        chosen: int,
    ) -> tuple[list[dict[str, Any]], list[TokenSequence]]:
        """Samples (prompt + window, goal) and prompt candidates from :meth:`plan`'s spans tokenized."""
        pieces = iter(tokenized)
        task = self.task_ids[episode.task]
        out = []
        for prompt, has_goal in plans:
            window = next(pieces)
            if prompt is not None and window.dynamics_ids is not None:
                # after another episode's prompt, the window's first observation has no previous
                # timestep in the context: its change (and value) cannot be predicted; not a target
                first = (window.timesteps == 0) & (window.types < TokenType.SEPARATOR)
                window = dataclasses.replace(
                    window, dynamics_ids=np.where(first, NO_TARGET, window.dynamics_ids)
                )
            sequence = TokenSequence.concatenate([prompt, window]) if prompt is not None else window
            sample = sequence_sample(sequence, len(prompt) if prompt is not None else 0, task, episode.key)
            if has_goal:
                sample |= goal_fields(next(pieces))
            out.append(sample)
        return out, list(pieces)[:chosen]

    def tiles(self, episode: Episode, goal_last: bool = False) -> list[dict[str, Any]]:
        """The whole episode as consecutive windows of whole timesteps of at most the context, no
        prompt (e.g. validation over held-out episodes); no goal, or with ``goal_last`` the
        episode's last observation as every window's goal (goal-reaching demos)."""
        bounds = self.bounds(episode)
        out, start, steps = [], 0, len(bounds) - 1
        history = self.history(episode.task)
        while start < steps:
            stop = _run_end(bounds, start, self.config.context_length)
            if history:
                stop = min(stop, start + history)
            out.append(
                sequence_sample(
                    self._tokens(episode, start, stop), 0, self.task_ids[episode.task], episode.key
                )
            )
            start = stop
        if goal_last:
            goal = goal_fields(self._tokens(episode, steps - 1, steps))
            out = [sample | goal for sample in out]
        return out


def goal_fields(goal: TokenSequence) -> dict[str, Any]:
    """A sample's ``goal_*`` fields: the observation tokens of one timestep (no separator, no action)."""
    keep = goal.types < TokenType.SEPARATOR  # text, image, continuous, discrete
    return {
        "goal_ids": goal.ids[keep],
        "goal_types": goal.types[keep],
        "goal_local_positions": goal.local_positions[keep],
        "goal_patches": goal.patches,
        "goal_patch_positions": goal.patch_positions,
    }


#: A ``dynamics_ids`` entry that is no target of the dynamics head (the model masks it out).
NO_TARGET = -1


def sequence_sample(sequence: TokenSequence, prompt_length: int, task_id: int, key: str) -> dict[str, Any]:
    """One training sample (what :func:`collate` takes) from a token sequence whose first
    ``prompt_length`` tokens are a prompt (never targets). Without change targets
    (``sequence.dynamics_ids`` None) the proprio tokens are no dynamics targets."""
    prompt_mask = np.zeros(len(sequence), dtype=bool)
    prompt_mask[:prompt_length] = True
    dynamics_ids = sequence.dynamics_ids
    if dynamics_ids is None:
        dynamics_ids = np.where(sequence.types == TokenType.CONTINUOUS, NO_TARGET, sequence.ids)
    return {
        "ids": sequence.ids,
        "dynamics_ids": dynamics_ids,
        "executed_ids": sequence.ids if sequence.executed_ids is None else sequence.executed_ids,
        "types": sequence.types,
        "local_positions": sequence.local_positions,
        "timesteps": sequence.timesteps,
        "loss_mask": sequence.loss_mask & ~prompt_mask,
        "prompt_mask": prompt_mask,
        "patches": sequence.patches,
        "patch_positions": sequence.patch_positions,
        "task": np.int64(task_id),
        "episode": key,
    }


def _run_end(bounds: np.ndarray, start: int, budget: int) -> int:
    """End (exclusive) of the longest run of whole timesteps from ``start`` within ``budget`` tokens (at least one)."""
    return max(int(np.searchsorted(bounds, bounds[start] + budget, side="right")) - 1, start + 1)


def _window_steps(bounds: np.ndarray, budget: int, rng: random.Random) -> tuple[int, int]:
    """A random run ``[start, stop)`` of whole timesteps of at most ``budget`` tokens (at least one)."""
    steps = len(bounds) - 1
    start = rng.randrange(steps)
    # the longest run from start that fits; if it reaches the end, slide back to fill the budget
    stop = _run_end(bounds, start, budget)
    if stop >= steps:
        stop = steps
        first = int(np.searchsorted(bounds, bounds[steps] - budget, side="left"))
        start = min(start, max(first, 0))
    return start, stop


class SequenceDataset(torch.utils.data.IterableDataset):
    """An iterable of training sequences over a dataset (use with :func:`make_dataloader`)."""

    def __init__(
        self, source: DatasetSource, config: LoaderConfig, text: TextTokenizer | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.config = config
        self.sampler = WindowSampler(source, config, text)
        self.skip_batches = 0
        """Batches of ``batch_size`` the DataLoader already delivered (a resumed run skips them)."""
        self.batch_size = 1
        self.batches = False
        """Yield collated batches (``task_batches`` with ``batch_tokens``) instead of samples."""
        self.collate: Any = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batches:  # whole batches of one task each (DataLoader batch_size=None)
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            batches = (self.collate(group) for group in self._task_groups())
            return itertools.islice(batches, len(range(worker, self.skip_batches, workers)), None)
        samples = self._samples()
        skip = self._skipped_samples()
        if skip:
            samples = itertools.islice(samples, skip, None)
        return samples

    def _skipped_samples(self) -> int:
        """Samples this worker drops to resume a stream after ``skip_batches`` batches: a
        DataLoader takes batch k from worker ``k % num_workers``, ``batch_size`` samples each."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return len(range(worker, self.skip_batches, workers)) * self.batch_size

    def _streams(self) -> tuple[dict[str, float], random.Random, dict[str, Iterator[Episode]], Pools]:
        """This worker's task weights, seeded generator, one episode stream per weighted task and
        empty prompt pools."""
        from webdataset.utils import pytorch_worker_seed

        cfg = self.config
        weights = {t: float((cfg.domain_weights or {}).get(t, 1.0)) for t in self.source.tasks}
        rng = random.Random(cfg.seed * 1_000_003 + pytorch_worker_seed())
        streams = {t: iter(episode_stream(self.source, t, cfg)) for t, w in weights.items() if w > 0}
        pools: Pools = defaultdict(lambda: deque(maxlen=cfg.prompt_pool))
        return weights, rng, streams, pools

    def _task_groups(self) -> Iterator[list[dict[str, Any]]]:
        """Lists of samples, one batch of one task each (``task_batches``)."""
        weights, rng, streams, pools = self._streams()
        return _task_batches(self.sampler, self.config, self.batch_size, streams, weights, rng, pools)

    def _samples(self) -> Iterator[dict[str, Any]]:
        """Samples of every task mixed (without ``task_batches``)."""
        cfg = self.config
        weights, rng, streams, pools = self._streams()
        buffer: list[dict[str, Any]] = []
        for episode in _mix(streams, weights, rng):
            bounds = self.sampler.bounds(episode)
            pool = pools[episode.task]
            # several windows per decoded episode (decoding dominates), mixed through a buffer
            count = self.sampler.windows_per_episode(episode.task, bounds) if cfg.resampled else 1
            samples, candidates = self.sampler.episode_samples(episode, bounds, rng, pool, count)
            for sample in samples:
                buffer.append(sample)
                if len(buffer) >= cfg.window_shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            pool.append((episode.key, candidates))
        rng.shuffle(buffer)
        yield from buffer


def _task_batches(
    sampler: WindowSampler,
    config: LoaderConfig,
    group: int,
    streams: dict[str, Iterator[Episode]],
    weights: dict[str, float],
    rng: random.Random,
    pools: Pools,
) -> Iterator[list[dict[str, Any]]]:
    """Batches of one task (or, with ``config.mix_tasks``, of one kind of action), the task or
    kind drawn with ``weights`` for each batch: a weight is a task's share of the optimizer steps
    (of the windows, when tasks mix), whatever its episodes' lengths (drawing per decoded episode
    gave BabyAI's short episodes ~2.5x the steps of a 1000-step control task). A batch is at most
    ``group`` windows and, with ``config.batch_tokens``, about that many tokens; windows come from
    a shuffle buffer per task (per kind when mixing) refilled from the tasks' streams."""
    members: dict[str, list[str]] = defaultdict(list)  # batch kind -> its tasks
    for name in weights:
        kind = sampler.source.specs[name].action.kind if config.mix_tasks else name
        members[kind].append(name)
    buffers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ready = max(group, config.window_shuffle_buffer)
    live = dict(streams)  # the weighted tasks' streams, until each is exhausted
    while live or any(buffers.values()):
        kinds = [k for k, names in members.items() if any(n in live for n in names) or buffers[k]]
        kind = rng.choices(kinds, weights=[sum(weights[n] for n in members[kind]) for kind in kinds])[0]
        buffer = buffers[kind]
        while len(buffer) < ready:
            drawn = [n for n in members[kind] if n in live]  # (only weighted tasks have streams)
            if not drawn:
                break
            # (one task: no draw, so the stream without mixing is what it was)
            name = drawn[0] if len(drawn) == 1 else rng.choices(drawn, weights=[weights[n] for n in drawn])[0]
            try:
                episode = next(live[name])
            except StopIteration:
                del live[name]
                continue
            bounds = sampler.bounds(episode)
            count = sampler.windows_per_episode(name, bounds) if config.resampled else 1
            samples, candidates = sampler.episode_samples(episode, bounds, rng, pools[name], count)
            buffer += samples
            pools[name].append((episode.key, candidates))
        budget = sampler.batch_tokens(members[kind][0])  # (one kind of action: one budget)
        if not buffer:
            continue
        if budget and config.length_groups and len(members[kind]) == 1:
            batch = _length_group(buffer, group, budget, config.length_groups, rng)
        elif budget and config.length_groups:
            # mixed tasks: grouped by length they would sort apart again (a 2-timestep pendulum
            # window is 10 tokens, reacher's 18), so only prompted and unprompted windows (~2x
            # apart) are kept apart
            batch = _length_group(buffer, group, budget, np.inf, rng, key=_prompted)
        else:
            batch, longest = [], 0
            while buffer and len(batch) < group:
                index = rng.randrange(len(buffer))
                longest = max(longest, len(buffer[index]["ids"]))
                if batch and budget and (len(batch) + 1) * longest > budget:
                    break  # the batch is closed before a window that would overflow its token budget
                batch.append(buffer.pop(index))
        yield batch


def _prompted(sample: dict[str, Any]) -> bool:
    return bool(sample["prompt_mask"][0])


def _length_group(
    buffer: list[dict[str, Any]],
    group: int,
    budget: int,
    factor: float,
    rng: random.Random,
    key: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Take a batch out of ``buffer``: a random first window, then, in random order, windows
    whose length is within ``factor`` of the first's (and, with ``key``, whose key is the
    first's), while the batch holds at most ``group`` windows and its padded size
    ``windows x longest`` stays within ``budget``."""
    first = buffer.pop(rng.randrange(len(buffer)))
    batch, longest = [first], len(first["ids"])
    low, high = longest / factor, longest * factor
    same = None if key is None else key(first)
    order = list(range(len(buffer)))
    rng.shuffle(order)
    taken = []
    for index in order:
        if len(batch) >= group:
            break
        length = len(buffer[index]["ids"])
        if not low <= length <= high or (key is not None and key(buffer[index]) != same):
            continue
        if (len(batch) + 1) * max(longest, length) > budget:
            break  # the batch is closed before a window that would overflow its token budget
        longest = max(longest, length)
        batch.append(buffer[index])
        taken.append(index)
    for index in sorted(taken, reverse=True):
        buffer.pop(index)
    return batch


def _mix(
    streams: dict[str, Iterator[Episode]], weights: dict[str, float], rng: random.Random
) -> Iterator[Episode]:
    """Draw the next episode from a task chosen with ``weights``, until every stream is exhausted.

    (webdataset's RandomMix draws from the global ``random`` module; this one is seeded, so a
    stream is reproducible and the same from a folder and from a URL.)
    """
    live = dict(streams)
    while live:
        names = list(live)
        name = rng.choices(names, weights=[weights[n] for n in names])[0]
        try:
            yield next(live[name])
        except StopIteration:
            del live[name]


# -- batching ------------------------------------------------------------------------------------------


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pad a list of sequences into a batch of torch tensors. B = batch, L = longest, P = most patches.

    Returns ``ids``/``dynamics_ids``/``executed_ids``/``types``/``local_positions``/``timesteps``
    (B, L) int64,
    ``attention_mask``,
    ``episode`` (B sample keys),
    ``loss_mask``, ``prompt_mask`` (B, L) bool, ``patches`` (B, P, 3, 16, 16) float32,
    ``patch_positions`` (B, P, 4), ``patch_mask`` (B, P) bool, ``task`` (B,); and the ``goal_*``
    equivalents when the samples carry goals (padded on the left: a goal ends where its episode
    starts; goal patches stay in order, so image positions still take them in order).
    """

    def pad(key: str, value: int | bool, dtype: Any, left: bool = False) -> Any:
        return torch.from_numpy(pad_rows([s[key] for s in samples], value, dtype, left))

    batch: dict[str, Any] = {
        "ids": pad("ids", pad_id, np.int64),
        "dynamics_ids": pad("dynamics_ids", pad_id, np.int64),
        "executed_ids": pad("executed_ids" if "executed_ids" in samples[0] else "ids", pad_id, np.int64),
        "types": pad("types", int(TokenType.PAD), np.int64),
        "local_positions": pad("local_positions", 0, np.int64),
        "timesteps": pad("timesteps", 0, np.int64),
        "loss_mask": pad("loss_mask", False, bool),
        "prompt_mask": pad("prompt_mask", False, bool),
        "task": torch.tensor([int(s["task"]) for s in samples]),
        "episode": [str(s["episode"]) for s in samples],
    }
    batch["attention_mask"] = batch["types"] != int(TokenType.PAD)
    batch |= _pad_patches(samples, "patches", "patch_positions", "patch")
    if "goal_ids" in samples[0]:
        # goals are padded on the left, so each goal ends right before its episode's first token,
        # as when acting (right padding put a position gap between goal and episode)
        batch["goal_ids"] = pad("goal_ids", pad_id, np.int64, left=True)
        batch["goal_types"] = pad("goal_types", int(TokenType.PAD), np.int64, left=True)
        batch["goal_local_positions"] = pad("goal_local_positions", 0, np.int64, left=True)
        batch["goal_attention_mask"] = batch["goal_types"] != int(TokenType.PAD)
        batch |= _pad_patches(samples, "goal_patches", "goal_patch_positions", "goal_patch")
    return batch


def _row_index(lengths: np.ndarray, longest: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every element of ``len(lengths)`` rows laid end to end (``sum(lengths)``
    each, int64) in a ``(rows, longest)`` array, each row at its start (or, ``left``, its end)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    if left:
        cols += np.repeat(longest - lengths, lengths)
    return rows, cols


def pad_rows(arrays: list[np.ndarray], value: int | bool, dtype: Any, left: bool = False) -> np.ndarray:
    """``(N, longest, *rest)``: arrays of shape ``(length_i, *rest)`` padded with ``value`` on the
    right (or the ``left``), in one scatter instead of one copy per array (a batch of ~400 short
    windows has 8-12 such fields)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    longest = int(lengths.max())
    out = np.full((len(arrays), longest, *arrays[0].shape[1:]), value, dtype=dtype)
    rows, cols = _row_index(lengths, longest, left)
    out[rows, cols] = np.concatenate(arrays)
    return out


def _pad_patches(
    samples: list[dict[str, np.ndarray]], key: str, positions: str, prefix: str
) -> dict[str, Any]:
    counts = np.array([len(s[key]) for s in samples], dtype=np.int64)
    most = max(int(counts.max()), 1)
    shape = samples[0][key].shape[1:]
    rows, cols = _row_index(counts, most, left=False)
    patches = np.zeros((len(samples), most, *shape), dtype=np.float32)
    where = np.zeros((len(samples), most, 4), dtype=np.int64)
    where[..., 2:] = 1  # a padded patch sits at (0, 0) of a 1x1 grid: valid input, masked out
    mask = np.zeros((len(samples), most), dtype=bool)
    if len(rows):  # most batches without images hold no patch at all
        patches[rows, cols] = np.concatenate([s[key] for s in samples])
        where[rows, cols] = np.concatenate([s[positions] for s in samples])
        mask[rows, cols] = True
    return {
        f"{prefix}es": torch.from_numpy(patches),
        f"{prefix}_positions": torch.from_numpy(where),
        f"{prefix}_mask": torch.from_numpy(mask),
    }


def make_dataloader(
    root: str | Path,
    batch_size: int,
    config: LoaderConfig | None = None,
    tasks: list[str] | None = None,
    num_workers: int = 2,
    skip_batches: int = 0,
) -> Any:
    """A torch DataLoader of padded batches from a dataset folder or URL.

    ``skip_batches``: start the (deterministic) stream after this many batches, so a resumed run
    sees the batches the uninterrupted run would have seen.
    """
    import functools

    config = config or LoaderConfig()
    source = DatasetSource.open(root, tasks)
    dataset = SequenceDataset(source, config)
    dataset.skip_batches, dataset.batch_size = skip_batches, batch_size
    pad_id = dataset.sampler.builders[source.tasks[0]].layout.pad_id
    if config.task_batches:  # the dataset makes the batches itself: each one task, never straddling
        dataset.batches, dataset.collate = True, functools.partial(collate, pad_id=pad_id)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(config.seed),
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, pad_id=pad_id),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: starting an iterator must not draw from the global torch RNG, which
        # dropout uses (a resumed run would otherwise see different dropout masks)
        generator=torch.Generator().manual_seed(config.seed),
    )
