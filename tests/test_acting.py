"""One acting core: the server's actions are the local Policy's, for every backbone and head."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_like.acting import ActingCore
from gato_like.checkpoint import load_checkpoint, save_checkpoint
from gato_like.config import Config
from gato_like.envs.registry import get_task
from gato_like.model import GatoModel
from gato_like.policy import Policy
from gato_like.serving.client import AsyncPolicyClient, ServerError
from gato_like.serving.engine import EngineConfig
from gato_like.serving.protocol import example_observation
from gato_like.serving.server import ServerConfig, background_server
from gato_like.tokenizers import TextTokenizer
from gato_like.training.recipes import ACTING

TASKS = ("dmc-point_mass-easy", "babyai-GoToRedBall")  # continuous and discrete actions


def _checkpoint(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", **overrides))
    specs = {get_task(t).spec.name: get_task(t).spec for t in TASKS}
    tasks = {t: {"embodiment": get_task(t).spec.name} for t in TASKS}
    return save_checkpoint(path, model, TextTokenizer(), specs, tasks)


def _obs(task: str, seed: int) -> dict:
    return example_observation(get_task(task).spec.to_dict(), np.random.default_rng(seed))


# (task, head, temperature): every head, greedy and sampled, both action kinds in one server
PLANS = [
    (TASKS[0], "policy", 0.0),
    (TASKS[0], "goal", 0.0),
    (TASKS[0], "prompt", 0.7),
    (TASKS[1], "policy", 0.0),
    (TASKS[1], "goal", 1.0),
    (TASKS[1], "policy", 2.0),
]


@pytest.mark.parametrize("backbone", ["decoder", "perceiver", "pooled", "pooled-acting", "pooled-goal"])
def test_server_actions_equal_local_policy_actions_for_every_head(tmp_path: Path, backbone: str) -> None:
    """Six concurrent sessions (two embodiments, the policy and goal heads, a prompt, greedy and
    sampled) share the server's forward passes; each gets exactly the actions a local Policy
    computes alone on the same observations. The contexts are short, so windows roll over.
    ``pooled-acting``: the CPU recipes' departures, every action token from one pass;
    ``pooled-goal``: those, with the goal joined to every timestep and each value offset from its
    goal value (``goal_placement="relative"``)."""
    context = {"decoder": 512, "perceiver": 48, "pooled": 24, "pooled-acting": 24, "pooled-goal": 24}[
        backbone
    ]
    extra = {"pooled-acting": ACTING, "pooled-goal": {**ACTING, "goal_placement": "relative"}}.get(
        backbone, {}
    )
    path = _checkpoint(tmp_path / backbone, backbone=backbone.split("-")[0], context_length=context, **extra)
    steps = 7
    observations = [[_obs(task, 100 * i + t) for t in range(steps)] for i, (task, _, _) in enumerate(PLANS)]
    goals = [_obs(task, 999 + i) for i, (task, _, _) in enumerate(PLANS)]
    prompt_episode = get_task(TASKS[0]).rollout(3, "expert", max_steps=2)
    prompt = (prompt_episode.observations, prompt_episode.actions)

    def reset_args(i: int) -> dict:
        _, head, temperature = PLANS[i]
        return {
            "goal": goals[i] if head == "goal" else None,
            "prompt": prompt if head == "prompt" else None,
            "temperature": temperature,
        }

    async def robot(url: str, i: int) -> tuple[list[np.ndarray], list[int]]:
        async with AsyncPolicyClient(url, task=PLANS[i][0]) as client:
            await client.reset(**reset_args(i))
            actions, batches = [], []
            for t in range(steps):
                reply = await client.step(observations[i][t])
                actions.append(reply["action"])
                batches.append(reply["timing"]["batch_size"])
            return actions, batches

    async def everyone(url: str):
        return await asyncio.gather(*(robot(url, i) for i in range(len(PLANS))))

    with background_server(load_checkpoint(path), EngineConfig(), ServerConfig(port=0)) as server:
        served = asyncio.run(everyone(f"ws://127.0.0.1:{server.port}"))
    assert max(b for _, batches in served for b in batches) > 1  # sessions shared forward passes
    for i, (task, _, _) in enumerate(PLANS):
        args = reset_args(i)
        local = Policy.from_checkpoint(path, temperature=args.pop("temperature"))
        local.reset(task, **args)
        for t in range(steps):
            np.testing.assert_array_equal(
                served[i][0][t], local.act(observations[i][t]), err_msg=f"{PLANS[i]} step {t}"
            )


def test_sampling_temperature_changes_the_draws_and_is_seeded(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ckpt")
    observations = [_obs(TASKS[1], t) for t in range(12)]

    def episode(temperature: float, seed: int = 0) -> list[int]:
        policy = Policy.from_checkpoint(path, temperature=temperature, seed=seed)
        policy.reset(TASKS[1])
        return [int(policy.act(o)[0]) for o in observations]

    greedy = episode(0.0)
    assert episode(5.0) == episode(5.0)  # seeded
    assert episode(5.0) != greedy and episode(5.0, seed=1) != episode(5.0)
    with pytest.raises(ValueError, match="temperature"):
        Policy.from_checkpoint(path, temperature=-1.0)


def test_server_refuses_a_temperature_out_of_range(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ckpt")

    async def ask(url: str) -> ServerError:
        async with AsyncPolicyClient(url, task=TASKS[0]) as client:
            with pytest.raises(ServerError) as caught:
                await client.reset(temperature=-0.5)
            return caught.value

    with background_server(load_checkpoint(path), EngineConfig(), ServerConfig(port=0)) as server:
        error = asyncio.run(ask(f"ws://127.0.0.1:{server.port}"))
    assert error.code == "BAD_MESSAGE" and error.key == "temperature" and "[0, 100]" in error.expected


def test_rows_of_different_embodiments_act_in_one_pass_and_release_keeps_the_others(tmp_path: Path) -> None:
    """A released row's place is taken by the last row, whose history moves with it: its next
    action is the one it would have taken in place."""
    checkpoint = load_checkpoint(_checkpoint(tmp_path / "ckpt"))
    core = ActingCore(checkpoint.model, checkpoint.text, rows=1)
    specs = [checkpoint.spec_for(t) for t in (TASKS[0], TASKS[1], TASKS[0])]
    rows = [core.allocate() for _ in specs]  # the cache grows from 1 row
    assert core.reset([(r, s, None, None) for r, s in zip(rows, specs, strict=True)]) == [None] * 3
    tasks = (TASKS[0], TASKS[1], TASKS[0])
    first = core.act([(r, _obs(t, i)) for i, (r, t) in enumerate(zip(rows, tasks, strict=True))])
    assert [a.shape for a in first] == [s.action.shape for s in specs]
    twin = ActingCore(checkpoint.model, checkpoint.text)
    alone = twin.allocate()
    twin.reset([(alone, specs[2], None, None)])
    twin.act([(alone, _obs(TASKS[0], 2))])
    core.release(rows[0])
    assert rows[2].index == 0 and rows[0].index == -1
    (moved,) = core.act([(rows[2], _obs(TASKS[0], 50))])
    np.testing.assert_array_equal(moved, twin.act([(alone, _obs(TASKS[0], 50))])[0])
    bad = core.act([(rows[1], {"nonsense": 1})])[0]
    assert isinstance(bad, Exception) and "nonsense" in str(bad)


@pytest.mark.parametrize(("task", "backbone", "before"), [(TASKS[0], "decoder", 1), (TASKS[0], "pooled", 1), (TASKS[1], "pooled", 0)])  # fmt: skip
def test_a_two_step_window_acts_as_a_full_forward_over_its_two_timesteps(
    tmp_path: Path, task: str, backbone: str, before: int
) -> None:
    """With ``history_steps=2`` (the CPU recipes) every step re-encodes the previous timestep in
    the same pass as the new observation; each action token's logits equal the training pass's
    over those two timesteps. A body with discrete actions under ``discrete_history_steps=1``
    sees its current timestep alone, as the loader cuts its windows."""
    from tests.test_policy import _reference_action_logits

    path = _checkpoint(tmp_path / "h2", history_steps=2, discrete_history_steps=1, backbone=backbone)
    policy = Policy.from_checkpoint(path)
    policy.reset(task)
    episode = get_task(task).rollout(1, "expert", max_steps=5)
    history: list = []
    for t in range(episode.length):
        observation = {k: v[t] for k, v in episode.observations.items()}
        action = policy.act(observation)
        reference = _reference_action_logits(policy, history[len(history) - before :], observation, action)
        torch.testing.assert_close(torch.cat(policy.last_logits), reference, rtol=1e-4, atol=1e-4)
        history.append((observation, action))


@pytest.mark.parametrize("placement", ["timestep", "relative", "relative-wide"])
@pytest.mark.parametrize("task", TASKS)
def test_a_goal_in_every_timestep_acts_as_the_training_pass(
    tmp_path: Path, task: str, placement: str
) -> None:
    """With ``goal_placement`` ``timestep`` the goal joins every timestep's fold (``relative``:
    and each value carries its offset from the goal's): each action token's logits when acting
    with a goal equal the goal head's in one training pass over the same two-timestep window and
    goal, and a different goal gives different logits. A reset computes the goal's fold once.
    ``relative-wide``: the fold sums in a width above the backbone's (``pool_width``)."""
    from tests.test_policy import _training_batch

    wide = {"pool_width": 96} if placement.endswith("-wide") else {}
    path = _checkpoint(tmp_path / "g", backbone="pooled", history_steps=2, discrete_history_steps=1,
                       goal_placement=placement.split("-")[0], **wide,
                       **{k: v for k, v in ACTING.items() if k != "history_steps"})  # fmt: skip
    policy = Policy.from_checkpoint(path)
    episode = get_task(task).rollout(2, "expert", max_steps=4)
    goal = {k: v[-1] for k, v in episode.observations.items()}
    folds: list = []
    fold = policy.core.goal_fold
    policy.core.goal_fold = lambda *args: folds.append(fold(*args)) or folds[-1]  # type: ignore[method-assign]
    policy.reset(task, goal=goal)
    del policy.core.goal_fold
    assert len(folds) == 1 and policy.envs[0].fold is folds[0]  # one fold a reset: the prefix's is the row's
    builder = policy.builder
    history: list = []
    before = policy.model.config.history_for(builder.spec.action.kind) - 1
    for t in range(episode.length):
        observation = {k: v[t] for k, v in episode.observations.items()}
        action = policy.act(observation)
        window = history[len(history) - before :] if before else []
        obs = {k: np.stack([h[0][k] for h in window] + [observation[k]]) for k in observation}
        seq = builder.build(obs, np.stack([h[1] for h in window] + [action]))
        batch = _training_batch(seq, builder.layout.pad_id)
        goal_tokens = policy.core.goal_tokens(builder, goal)
        batch |= {"goal_ids": torch.from_numpy(goal_tokens.ids)[None], "goal_types": torch.from_numpy(goal_tokens.types).long()[None],
                  "goal_local_positions": torch.from_numpy(goal_tokens.local_positions).long()[None],
                  "goal_attention_mask": torch.ones(1, len(goal_tokens), dtype=torch.bool),
                  "goal_patches": torch.from_numpy(goal_tokens.patches)[None],
                  "goal_patch_positions": torch.from_numpy(goal_tokens.patch_positions)[None],
                  "goal_patch_mask": torch.ones(1, len(goal_tokens.patches), dtype=torch.bool)}  # fmt: skip
        with torch.no_grad():
            logits = policy.model(batch, goal=True, logits=True)["goal_logits"][0]
        low, high = builder.action_id_range()
        reference = logits[len(seq) - 1 - builder.action_size : len(seq) - 1, low:high]
        torch.testing.assert_close(torch.cat(policy.last_logits), reference, rtol=1e-4, atol=1e-4)
        history.append((observation, action))
    other = {k: v[0] for k, v in episode.observations.items()}
    policy.reset(task, goal=other)
    policy.act({k: v[-1] for k, v in episode.observations.items()})
    moved = torch.cat(policy.last_logits)
    policy.reset(task, goal=goal)
    policy.act({k: v[-1] for k, v in episode.observations.items()})
    assert not torch.allclose(moved, torch.cat(policy.last_logits))


def test_a_refused_request_changes_no_row(tmp_path: Path) -> None:
    """Released rows are refused (not written through index -1); Policy.act_batch is all or
    nothing: one environment's bad observation leaves every environment as it was."""
    path = _checkpoint(tmp_path / "ckpt")
    checkpoint = load_checkpoint(path)
    core = ActingCore(checkpoint.model, checkpoint.text)
    spec = checkpoint.spec_for(TASKS[0])
    kept, gone = core.allocate(), core.allocate()
    core.reset([(kept, spec, None, None), (gone, spec, None, None)])
    core.release(gone)
    before = [k[0].clone() for k in core.cache.k], int(core.cache.lengths[0])
    assert isinstance(core.reset([(gone, spec, None, None)])[0], ValueError)
    assert isinstance(core.act([(gone, _obs(TASKS[0], 0))])[0], RuntimeError)
    assert all(torch.equal(k[0], b) for k, b in zip(core.cache.k, before[0], strict=True))
    assert int(core.cache.lengths[0]) == before[1] and kept.index == 0

    policy, fresh = Policy.from_checkpoint(path), Policy.from_checkpoint(path)
    policy.reset(TASKS[0], num_envs=2)
    fresh.reset(TASKS[0], num_envs=2)
    good = [_obs(TASKS[0], 1), _obs(TASKS[0], 2)]
    with pytest.raises(ValueError, match="position"):
        policy.act_batch([good[0], {**good[1], "position": np.zeros(7, np.float32)}])
    for a, b in zip(policy.act_batch(good), fresh.act_batch(good), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="position"):  # a bad goal: the episodes carry on as they were
        policy.reset(TASKS[0], goal={**good[0], "position": np.zeros(7, np.float32)}, num_envs=2)
    for a, b in zip(policy.act_batch(good[::-1]), fresh.act_batch(good[::-1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_engine_refuses_a_reset_of_a_closed_session(tmp_path: Path) -> None:
    from gato_like.serving.engine import Engine
    from gato_like.serving.protocol import ProtocolError

    async def scenario() -> str:
        engine = Engine(load_checkpoint(_checkpoint(tmp_path / "ckpt")))
        await engine.start(warmup=False)
        try:
            session = engine.open_session(object())
            engine.close_session(session, "bye")
            with pytest.raises(ProtocolError) as closed:
                await engine.reset(session, task=TASKS[0])
            return closed.value.code
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == "SESSION_EXPIRED"


def test_the_cache_grows_with_the_rows_and_gives_memory_back(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(_checkpoint(tmp_path / "ckpt"))
    core = ActingCore(checkpoint.model, checkpoint.text, rows=2)
    spec = checkpoint.spec_for(TASKS[0])
    rows = [core.allocate() for _ in range(16)]
    assert core.cache.k[0].shape[0] == 16
    core.reset([(r, spec, None, None) for r in rows])
    core.act([(r, _obs(TASKS[0], i)) for i, r in enumerate(rows)])
    survivor = rows[5]
    expected = ActingCore(checkpoint.model, checkpoint.text)
    twin = expected.allocate()
    expected.reset([(twin, spec, None, None)])
    expected.act([(twin, _obs(TASKS[0], 5))])
    for r in rows:
        if r is not survivor:
            core.release(r)
    assert core.cache.k[0].shape[0] == 2 and survivor.index == 0  # halved down to its start
    (after,) = core.act([(survivor, _obs(TASKS[0], 99))])  # its history survived the shrinking
    np.testing.assert_array_equal(after, expected.act([(twin, _obs(TASKS[0], 99))])[0])


async def _gated(engine) -> tuple[asyncio.Future, threading.Event]:
    """Hold the engine's worker on a call until the event is set, so that every request queued
    meanwhile is taken in its next tick (one shared batch), which starts after the gate opens."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait()

    held = asyncio.ensure_future(engine._call(hold))
    await asyncio.to_thread(entered.wait)
    return held, gate


def test_a_refused_session_in_a_shared_batch_leaves_its_bystander_as_a_local_policy(tmp_path: Path) -> None:
    """In one tick: the bystander's step, a step of another session refused past its deadline and
    a reset refused for a prompt longer than half the context; then a reset refused for a bad goal
    beside the bystander's next step and the late step's resend. The bystander's actions stay a local Policy's, and each
    refused session carries on as if its refused request had never been sent."""
    from gato_like.serving import protocol as p
    from gato_like.serving.engine import Engine
    from gato_like.serving.protocol import ProtocolError

    path = _checkpoint(tmp_path / "ckpt", context_length=256)
    task = TASKS[0]
    long_prompt = get_task(task).rollout(3, "expert", max_steps=60)  # 60 x 7 tokens > 128
    prompt = {"obs": long_prompt.observations, "actions": long_prompt.actions}
    steps = 5
    observations = {name: [_obs(task, 10 * i + t) for t in range(steps)] for i, name in enumerate("abc")}

    async def scenario() -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
        engine = Engine(load_checkpoint(path))
        await engine.start(warmup=False)
        refused: dict[str, str] = {}

        async def refusal(name: str, request) -> None:
            with pytest.raises(ProtocolError) as error:
                await request
            refused[name] = error.value.code

        try:
            a, b, c = (engine.open_session(object()) for _ in range(3))
            for session in (a, b, c):
                await engine.reset(session, task=task)
            actions: dict[str, list[np.ndarray]] = {"a": [], "b": [], "c": []}

            async def step(session, name: str, t: int) -> None:
                reply = await engine.step(session, t, observations[name][t])
                actions[name].append(p.decode_array(reply["action"], "action"))

            held, gate = await _gated(engine)
            tasks = [
                asyncio.ensure_future(step(a, "a", 0)),
                asyncio.ensure_future(
                    refusal("late step", engine.step(b, 0, observations["b"][0], deadline_ms=1))
                ),
                asyncio.ensure_future(refusal("long prompt", engine.reset(c, task=task, prompt=prompt))),
            ]
            await asyncio.sleep(0.05)  # every request is queued behind the held worker, past b's deadline
            gate.set()
            await asyncio.gather(held, *tasks)
            bad_goal = {**observations["a"][0], "position": np.zeros(7, np.float32)}
            await asyncio.gather(step(a, "a", 1), step(b, "b", 0), refusal("bad goal", engine.reset(c, task=task, goal=bad_goal)))  # fmt: skip
            for t in range(2, steps):
                await asyncio.gather(step(a, "a", t), step(b, "b", t - 1), step(c, "c", t - 2))
            await asyncio.gather(step(b, "b", steps - 1), step(c, "c", steps - 2))
            await step(c, "c", steps - 1)
            return actions, refused
        finally:
            await engine.stop()

    actions, refused = asyncio.run(scenario())
    assert refused == {
        "late step": "DEADLINE_EXCEEDED",
        "long prompt": "INVALID_PROMPT",
        "bad goal": "INVALID_PROMPT",
    }
    for name in "abc":
        local = Policy.from_checkpoint(path)
        local.reset(task)
        for t in range(steps):
            np.testing.assert_array_equal(
                actions[name][t], local.act(observations[name][t]), err_msg=f"{name} {t}"
            )


def test_a_reset_queued_behind_its_sessions_close_is_refused_and_frees_nothing_twice(tmp_path: Path) -> None:
    """A reset taken in the same tick as its session's close is refused (SESSION_EXPIRED), the
    session's cache row is given back once, and another session keeps its row and its actions."""
    from gato_like.serving import protocol as p
    from gato_like.serving.engine import Engine
    from gato_like.serving.protocol import ProtocolError

    path = _checkpoint(tmp_path / "ckpt")
    task = TASKS[0]
    observations = [_obs(task, t) for t in range(3)]

    async def scenario() -> tuple[str, list[np.ndarray], int]:
        engine = Engine(load_checkpoint(path))
        await engine.start(warmup=False)
        try:
            keep, gone = engine.open_session(object()), engine.open_session(object())
            await engine.reset(keep, task=task)
            await engine.reset(gone, task=task)
            actions = [p.decode_array((await engine.step(keep, 0, observations[0]))["action"], "action")]
            held, gate = await _gated(engine)
            reset = asyncio.ensure_future(engine.reset(gone, task=task))
            await asyncio.sleep(0.05)  # the reset is queued behind the held worker
            engine.close_session(gone, "bye")  # ... and its close behind it
            gate.set()
            await held
            with pytest.raises(ProtocolError) as error:
                await reset
            for t in (1, 2):
                actions.append(
                    p.decode_array((await engine.step(keep, t, observations[t]))["action"], "action")
                )
            live = await engine._call(lambda: sum(engine.pool.live(s.slot) for s in (keep, gone)))
            return error.value.code, actions, live
        finally:
            await engine.stop()

    code, actions, live = asyncio.run(scenario())
    assert code == "SESSION_EXPIRED" and live == 1
    local = Policy.from_checkpoint(path)
    local.reset(task)
    for t, observation in enumerate(observations):
        np.testing.assert_array_equal(actions[t], local.act(observation), err_msg=f"step {t}")
