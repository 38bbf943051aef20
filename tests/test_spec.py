import json

import numpy as np
import pytest

from gato_like.envs.babyai import BABYAI_SPEC
from gato_like.envs.registry import get_task
from gato_like.tokenizers import EmbodimentSpec, SpecError, SpecMismatchError

ARM = {
    "name": "arm",
    "control_hz": 20,
    "observations": {
        "joints": {"kind": "proprio", "shape": [3], "low": -3.2, "high": 3.2},
        "camera": {"kind": "image", "shape": [32, 32, 3]},
        "instruction": {"kind": "text"},
        "gripper": {"kind": "discrete", "shape": [1], "num_values": 2},
    },
    "action": {"kind": "continuous", "shape": [3], "low": [-1, -1, -2], "high": [1, 1, 2]},
}


def test_round_trip_through_json(tmp_path) -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    assert list(spec.observations) == ["camera", "gripper", "instruction", "joints"]  # sorted
    assert spec.action.size == 3 and spec.action.high.tolist() == [1, 1, 2]
    path = tmp_path / "embodiment.json"
    path.write_text(spec.to_json())
    again = EmbodimentSpec.from_file(path)
    assert again == spec and again.to_dict() == spec.to_dict()
    for data in (get_task("dmc-cartpole-swingup").spec.to_dict(), BABYAI_SPEC):
        assert EmbodimentSpec.from_json(json.dumps(data)).to_dict()["name"] == data["name"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"control_hz": 0}, "control_hz: expected a positive number, got 0"),
        ({"name": ""}, "name: expected a non-empty string"),
        ({"contol_hz": 3}, "contol_hz: unknown field (did you mean 'control_hz'?)"),
        ({"observations": {}}, "observations: expected a non-empty object"),
        (
            {"observations": {"x": {"kind": "lidar", "shape": [3]}}},
            "observations.x.kind: expected one of ['proprio', 'image', 'text', 'discrete'], got 'lidar'",
        ),
        (
            {"observations": {"x": {"kind": "proprio", "shape": [3, -1]}}},
            "observations.x.shape: expected a list of positive integers, got [3, -1]",
        ),
        ({"observations": {"x": {"kind": "proprio"}}}, "observations.x.shape: missing"),
        (
            {"observations": {"x": {"kind": "image", "shape": [8, 8]}}},
            "observations.x.shape: expected [H, W, C] with C 1 or 3",
        ),
        (
            {"observations": {"x": {"kind": "image", "shape": [8, 8, 3], "dtype": "float32"}}},
            "observations.x.dtype: expected one of ['uint8']",
        ),
        (
            {"observations": {"x": {"kind": "proprio", "shape": [2], "low": [0, 1, 2]}}},
            "observations.x.low: expected a number or shape [2], got shape [3]",
        ),
        (
            {"observations": {"x": {"kind": "proprio", "shape": [1], "low": 1, "high": 0}}},
            "observations.x: expected low < high",
        ),
        (
            {"observations": {"x": {"kind": "discrete", "shape": [1], "num_values": 5000}}},
            "observations.x.num_values: expected at most 1024, got 5000",
        ),
        (
            {"observations": {"x": {"kind": "discrete", "shape": [1]}}},
            "observations.x.num_values: expected a positive integer, got None",
        ),
        (
            {
                "observations": {
                    "x": {"kind": "discrete", "shape": [4, 3], "num_values": 11, "cell_values": [11, 6]}
                }
            },
            "observations.x.cell_values: expected one entry per element of the last axis (3), got [11, 6]",
        ),
        (
            {
                "observations": {
                    "x": {"kind": "discrete", "shape": [2], "num_values": 40, "cell_values": [40, 40]}
                }
            },
            "observations.x.cell_values: a cell takes prod(cell_values) = 1600 values; expected at most 1024",
        ),
        (
            {
                "observations": {
                    "x": {"kind": "discrete", "shape": [2], "num_values": 4, "cell_values": [5, 2]}
                }
            },
            "observations.x.cell_values: expected entries of at most num_values (4), got [5, 2]",
        ),
        (
            {"observations": {"x": {"kind": "proprio", "shape": [2], "cell_values": [2, 2]}}},
            "observations.x.cell_values: applies to discrete observations only, not 'proprio'",
        ),
        (
            {"observations": {"x": {"kind": "text", "shape": [2]}}},
            "observations.x.shape: a text observation is one string per timestep",
        ),
        (
            {"action": {"kind": "continuous", "shape": [2]}},
            "action.low: missing; a continuous action needs bounds",
        ),
        (
            {"action": {"kind": "discrete", "num_choices": 0}},
            "action.num_choices: expected a positive integer, got 0",
        ),
        (
            {"action": {"kind": "torque"}},
            "action.kind: expected one of ['continuous', 'discrete'], got 'torque'",
        ),
    ],
)
def test_invalid_specs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(SpecError) as error:
        EmbodimentSpec.from_dict({**ARM, **change})
    assert any(message in problem for problem in error.value.problems), error.value.problems


def test_every_problem_is_reported_at_once(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**ARM, "control_hz": -1, "action": {"kind": "discrete"}}))
    with pytest.raises(SpecError, match=r"invalid embodiment spec 'arm' in '.*bad.json' \(2 problem\(s\)\)"):
        EmbodimentSpec.from_file(path)
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        EmbodimentSpec.from_file(path)
    with pytest.raises(FileNotFoundError, match=r"embodiment spec .*missing\.json"):
        EmbodimentSpec.from_file(tmp_path / "missing.json")


def _episode(steps: int = 4) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = {
        "joints": rng.uniform(-3, 3, (steps, 3)).astype(np.float32),
        "camera": rng.integers(0, 255, (steps, 32, 32, 3), dtype=np.uint8),
        "instruction": np.array(["reach the goal"] * steps),
        "gripper": rng.integers(0, 2, (steps, 1)),
    }
    return obs, rng.uniform(-1, 1, (steps, 3)).astype(np.float32)


def test_check_episode_accepts_matching_data() -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    obs, actions = _episode()
    assert spec.check_episode(obs, actions) == 4
    assert spec.check_episode(obs, actions[:3]) == 4  # last step awaiting its action


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o, a: o.pop("joints"), "obs.joints: missing key: expected present, got absent"),
        (lambda o, a: o.update(extra=np.zeros((4, 1))), "obs.extra: unexpected key"),
        (
            lambda o, a: o.update(joints=np.zeros((4, 2), np.float32)),
            "obs.joints: wrong shape: expected (4, 3), got (4, 2)",
        ),
        (
            lambda o, a: o.update(joints=np.zeros((4, 3), np.int64)),
            "obs.joints: wrong dtype: expected a float dtype (float32), got int64",
        ),
        (
            lambda o, a: o["joints"].__setitem__((2, 1), np.nan),
            "obs.joints: non-finite value: expected finite values, got nan at index (2, 1)",
        ),
        (
            lambda o, a: o["joints"].__setitem__((1, 0), 7.0),
            "obs.joints: out of bounds: expected values in [-3.2, 3.2], got 7.0 at index (1, 0)",
        ),
        (
            lambda o, a: o.update(camera=o["camera"].astype(np.float32)),
            "obs.camera: wrong dtype: expected uint8, got float32",
        ),
        (
            lambda o, a: o.update(gripper=np.full((4, 1), 2)),
            "obs.gripper: out of range: expected integers in [0, 2), got 2 at index (0, 0)",
        ),
        (
            lambda o, a: o.update(instruction=np.array([1, 2, 3, 4], dtype=object)),
            "obs.instruction: wrong type: expected str, got int",
        ),
        (
            lambda o, a: a.__setitem__((3, 2), 2.5),
            "actions: out of bounds: expected values in [-2.0, 2.0], got 2.5 at index (3, 2)",
        ),
        (lambda o, a: a.__setitem__((0, 0), np.inf), "actions: non-finite value"),
    ],
)
def test_check_episode_names_key_expected_and_got(mutate, expected: str) -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    obs, actions = _episode()
    mutate(obs, actions)
    with pytest.raises(SpecMismatchError) as error:
        spec.check_episode(obs, actions)
    assert any(str(v).startswith(expected) for v in error.value.violations), [
        str(v) for v in error.value.violations
    ]


def test_action_length_and_step_checks() -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    obs, actions = _episode()
    with pytest.raises(SpecMismatchError, match="actions: wrong length: expected 4 or 3 rows"):
        spec.check_episode(obs, actions[:1])
    with pytest.raises(SpecMismatchError, match=r"actions: wrong dtype: expected a float dtype, got int64"):
        spec.check_episode(obs, actions.astype(np.int64))
    step = {k: v[0] for k, v in obs.items()}
    spec.check_step(step)
    step["camera"] = step["camera"][:16]
    with pytest.raises(
        SpecMismatchError, match=r"camera: wrong shape: expected \(32, 32, 3\), got \(16, 32, 3\)"
    ):
        spec.check_step(step)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (
            {"kind": "continuous", "shape": [1], "low": -1, "high": float("inf")},
            "action.high: expected finite numbers",
        ),
        (
            {"kind": "continuous", "shape": [1], "low": -1e308, "high": 1e308},
            "action.low: expected finite numbers within",
        ),
        (
            {"kind": "continuous", "shape": [1], "low": True, "high": 1},
            "action.low: expected a number or a (nested) list of numbers, got True",
        ),
        (
            {"kind": "continuous", "shape": [1], "low": "-1", "high": 1},
            "action.low: expected a number or a (nested) list of numbers, got '-1'",
        ),
    ],
)
def test_bounds_must_be_finite_numbers(action: dict, message: str) -> None:
    with pytest.raises(SpecError) as error:
        EmbodimentSpec.from_dict({**ARM, "action": action})
    assert any(message in p for p in error.value.problems), error.value.problems


def test_equal_specs_hash_equal_and_metadata_is_plain_json() -> None:
    a = EmbodimentSpec.from_dict({**ARM, "metadata": {"a": 1, "b": 2}})
    b = EmbodimentSpec.from_dict({**ARM, "metadata": {"b": 2, "a": 1}})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != EmbodimentSpec.from_dict({**ARM, "control_hz": 21})
    with pytest.raises(SpecError, match="metadata: expected plain JSON values"):
        EmbodimentSpec.from_dict({**ARM, "metadata": {"x": np.zeros(2)}})


def test_float32_data_at_a_float64_bound_is_in_bounds() -> None:
    spec = EmbodimentSpec.from_dict(
        {**ARM, "observations": {"x": {"kind": "proprio", "shape": [1], "low": -0.1, "high": 0.1}}}
    )
    spec.check_step({"x": np.array([0.1], np.float32)})
    with pytest.raises(SpecMismatchError, match="x: out of bounds"):
        spec.check_step({"x": np.array([0.1001], np.float32)})


def test_discrete_uint8_spec_accepts_any_integer_dtype() -> None:
    spec = EmbodimentSpec.from_dict(
        {**ARM, "observations": {"v": {"kind": "discrete", "shape": [2], "num_values": 5, "dtype": "uint8"}}}
    )
    spec.check_step({"v": np.array([1, 4], np.int64)})


@pytest.mark.parametrize(
    ("observations", "actions", "expected"),
    [
        ({"joints": [[1.0, 2.0], [1.0]]}, None, "obs.joints: not an array"),
        (None, None, "observations: expected a mapping"),
    ],
)
def test_malformed_episode_containers_get_named_errors(observations, actions, expected: str) -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    with pytest.raises((SpecMismatchError, TypeError), match=expected):
        spec.check_episode(observations, actions)


def test_actions_that_are_not_rows_are_named() -> None:
    spec = EmbodimentSpec.from_dict(ARM)
    obs, _ = _episode()
    with pytest.raises(
        SpecMismatchError, match=r"actions: wrong length: expected 4 or 3 rows .*got not an array of rows"
    ):
        spec.check_episode(obs, np.float32(0.3))
    with pytest.raises(SpecMismatchError, match="obs: empty episode"):
        spec.check_episode({k: v[:0] for k, v in obs.items()}, None)


def test_spec_file_problems(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is a directory"):
        EmbodimentSpec.from_file(tmp_path)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(SpecError, match="expected UTF-8 JSON text"):
        EmbodimentSpec.from_file(path)
