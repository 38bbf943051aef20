"""``gato-like data convert --from minari DATASET``: a Minari dataset (offline RL from gymnasium
environments) as shards of one task.

``DATASET`` is a dataset id in the local Minari store (``$MINARI_DATASETS_PATH``, else
``~/.minari/datasets``; nothing is downloaded: ``minari download ID`` does that) or the path of a
dataset's folder. The embodiment spec comes from the dataset's gymnasium spaces, mapped as
``gato-like eval --gym`` maps a live environment's
(:class:`~gato_like.tokenizers.gym_spaces.SpaceMapping`): the task is named ``gym-<env id>``, so
a model fine-tuned on it is evaluated with ``--gym <env id>``. ``--spec`` gives a spec of your own
instead (same keys and shapes; a name and description of your choice).

Minari records ``T + 1`` observations per episode (the last one after the last action): the
importer keeps the ``T`` that an action follows. Every episode is converted and checked before
anything is written.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gato_like.data_pipelines.convert import gather
from gato_like.data_pipelines.episodes import Episode
from gato_like.data_pipelines.shards import check_task_name
from gato_like.tokenizers.gym_spaces import SpaceMapping, control_hz_of
from gato_like.tokenizers.spec import EmbodimentSpec, SpecError

#: The control rate given to a dataset whose environment states none (and cannot be made here).
FALLBACK_HZ = 50.0


def _minari() -> Any:
    try:
        import minari
    except ImportError as error:
        raise ImportError(
            "--from minari needs the minari package: pip install 'gato-like[minari]' "
            f"(or pip install 'minari[hdf5]'); import failed: {error}"
        ) from error
    return minari


def open_dataset(dataset: str | Path) -> Any:
    """A ``MinariDataset`` from a local id or a folder (the dataset's, or its ``data/``)."""
    minari = _minari()
    path = Path(dataset)
    for candidate in (path / "data", path):
        if (candidate / "metadata.json").is_file():
            return minari.MinariDataset(str(candidate))
    if path.exists():
        raise FileNotFoundError(
            f"{path}: not a Minari dataset folder (expected {path}/data/metadata.json beside main_data.hdf5)"
        )
    from minari.storage import get_dataset_path

    local = get_dataset_path(str(dataset))
    if not (local / "data" / "metadata.json").is_file():
        known = sorted(minari.list_local_datasets())
        raise FileNotFoundError(
            f"Minari dataset {str(dataset)!r} is not in the local store {get_dataset_path()} "
            f"($MINARI_DATASETS_PATH or ~/.minari/datasets); this command downloads nothing: run "
            f"`minari download {dataset}` first, or give the dataset's folder "
            f"(local datasets: {', '.join(known) if known else 'none'})"
        )
    return minari.MinariDataset(str(local / "data"))


def _control_hz(env_spec: Any) -> float:
    """The control rate of the dataset's environment when it can be made here, else the fallback."""
    if env_spec is None:
        return FALLBACK_HZ
    try:
        import gymnasium as gym

        env = gym.make(env_spec)
    except Exception:  # the environment's package may be absent here; the rate is all we need
        return FALLBACK_HZ
    try:
        return control_hz_of(env) or FALLBACK_HZ
    finally:
        env.close()


def _at(tree: Any, t: int) -> Any:
    """Timestep ``t`` of a batched observation (arrays, lists of strings, dicts and tuples of them)."""
    if isinstance(tree, dict):
        return {k: _at(v, t) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_at(v, t) for v in tree)
    return tree[t]


def _episode(data: Any, mapping: SpaceMapping, spec: EmbodimentSpec, task: str, source: str) -> Episode:
    actions = data.actions
    steps = len(data.rewards)
    if steps == 0:
        raise ValueError("an empty episode (no steps)")
    rows = [mapping.observation(_at(data.observations, t)) for t in range(steps)]
    observations = {
        key: (
            np.asarray([r[key] for r in rows], dtype=str)
            if spec.observations[key].kind == "text"
            else np.stack([r[key] for r in rows])
        )
        for key in spec.observations
    }
    recorded = np.stack([mapping.recorded_action(_at(actions, t)) for t in range(steps)])
    rewards = np.asarray(data.rewards, dtype=np.float32)
    if not np.isfinite(rewards).all():
        raise ValueError("rewards: NaN or Inf")
    spec.check_episode(observations, recorded)
    infos = data.infos if isinstance(data.infos, dict) else {}
    flags = infos.get("success", infos.get("is_success"))
    success = bool(np.asarray(flags).reshape(-1)[-1]) if flags is not None and np.size(flags) else False
    return Episode(
        task=task,
        embodiment=spec.name,
        observations=observations,
        actions=recorded.astype(spec.action.dtype),
        rewards=rewards,
        success=success,
        source=f"{source}, episode {data.id}",
        seed=None if getattr(data, "seed", None) is None else int(data.seed),
    )


def load_minari(
    dataset: str | Path,
    task: str | None = None,
    spec_file: str | Path | None = None,
    max_episodes: int | None = None,
) -> tuple[EmbodimentSpec, list[Episode], dict[str, Any]]:
    """The spec, the converted episodes and the dataset's metadata (``dataset_id``, ``env_id``,
    ``ref_min_score``, ...). Raises :class:`~gato_like.data_pipelines.convert.ConversionError`
    listing every episode that fails."""
    data = open_dataset(dataset)
    meta = dict(data.storage.metadata)
    env_spec = data.env_spec
    env_id = getattr(env_spec, "id", None)
    name = (
        f"gym-{env_id}" if env_id else str(meta.get("dataset_id", Path(str(dataset)).name)).replace("/", "-")
    )
    try:
        mapping = SpaceMapping(data.observation_space, data.action_space, name, _control_hz(env_spec))
    except SpecError as error:
        raise ValueError(f"Minari dataset {meta.get('dataset_id', dataset)}: its spaces cannot be tokenized: {error}") from error  # fmt: skip
    spec = mapping.spec
    if spec_file is not None:
        given = EmbodimentSpec.from_file(spec_file)
        if given.differences(spec, "--spec", "the dataset", body_only=True):
            raise ValueError(
                f"--spec {spec_file} does not fit the dataset's spaces: "
                + "; ".join(given.differences(spec, "--spec", "the dataset", body_only=True))
            )
        spec = given
    task = check_task_name(task or spec.name)
    source = f"minari {meta.get('dataset_id', dataset)} ({meta.get('algorithm_name') or 'unknown policy'})"
    chosen = itertools.islice(data.iterate_episodes(), max_episodes)
    episodes = gather((f"episode {e.id}", partial(_episode, e, mapping, spec, task, source)) for e in chosen)
    if not episodes:
        raise ValueError(f"Minari dataset {meta.get('dataset_id', dataset)}: no episodes")
    meta["env_id"] = env_id
    return spec, episodes, meta
