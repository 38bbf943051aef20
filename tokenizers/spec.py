"""Embodiment specs: what a robot observes and how it acts, as JSON loaded into typed dataclasses.

Example (``embodiment.json``)::

    {
      "name": "cartpole",
      "control_hz": 50,
      "observations": {
        "position": {"kind": "proprio", "shape": [3]},
        "velocity": {"kind": "proprio", "shape": [2], "low": -50, "high": 50},
        "pixels":   {"kind": "image", "shape": [64, 64, 3]},
        "mission":  {"kind": "text"},
        "carrying": {"kind": "discrete", "shape": [2], "num_values": 11}
      },
      "action": {"kind": "continuous", "shape": [1], "low": -1, "high": 1}
    }

Observation kinds: ``proprio`` (float, mu-law tokens, optional ``low``/``high`` bounds checked on
input), ``image`` (uint8 ``(H, W, C)``, C in {1, 3}), ``text`` (one string per timestep) and
``discrete`` (integers in ``[0, num_values)``, ``num_values <= 1024``; with ``cell_values``, one
token per cell of the last axis, e.g. ``"cell_values": [11, 6, 3]`` for a grid of (object,
colour, state) cells). Action kinds:
``continuous`` (``low``/``high`` required; scaled to [-1, 1] before binning) and ``discrete``
(``num_choices``). Bounds are a number or a nested list of the observation's shape.

Every problem is reported with the field's path (``observations.pixels.shape``), what was expected
and what was found; :meth:`EmbodimentSpec.check_episode` and :meth:`EmbodimentSpec.check_step` do
the same for data against the spec.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gato_like.tokenizers.vocab import DISCRETE_VALUES

ObservationKind = Literal["proprio", "image", "text", "discrete"]
ActionKind = Literal["continuous", "discrete"]
OBSERVATION_KINDS: tuple[str, ...] = ("proprio", "image", "text", "discrete")
ACTION_KINDS: tuple[str, ...] = ("continuous", "discrete")
DEFAULT_DTYPES = {
    "proprio": "float32",
    "image": "uint8",
    "text": "str",
    "discrete": "int64",
    "continuous": "float32",
}
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-/]*$")
#: Relative slack on bounds, for float rounding at the bound itself.
BOUND_TOLERANCE = 1e-6
#: Largest magnitude a bound may have (keeps ``high - low`` finite in float64).
MAX_BOUND = 1e30


class SpecError(ValueError):
    """An embodiment spec that is not valid. ``problems`` lists ``"path: what is wrong"`` lines."""

    def __init__(self, name: str, problems: list[str], source: str | Path | None = None) -> None:
        self.name = name
        self.problems = problems
        where = f" in {str(source)!r}" if source is not None else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid embodiment spec {name!r}{where} ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Violation:
    """One way data fails its spec: which key, what is wrong, what was expected and what came."""

    key: str
    problem: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}: expected {self.expected}, got {self.got}"


class SpecMismatchError(ValueError):
    """Data that does not match its embodiment spec; ``violations`` has one entry per problem."""

    def __init__(self, name: str, violations: list[Violation], what: str = "episode") -> None:
        self.violations = violations
        lines = "\n".join(f"  - {v}" for v in violations)
        super().__init__(
            f"{what} does not match embodiment spec {name!r} ({len(violations)} problem(s)):\n{lines}"
        )


def _dtype_ok(kind: str, spec_dtype: str, array: np.ndarray) -> bool:
    """Same kind of number as the spec: any float for a float spec, any integer (not bool) for an
    integer one, bool or any integer for a bool one; images must be exactly uint8."""
    if kind == "image":
        return array.dtype == np.uint8
    kind = np.dtype(spec_dtype).kind
    if kind == "f":
        return array.dtype.kind == "f"
    return array.dtype.kind in ("iub" if kind == "b" else "iu")


def _dtype_expectation(kind: str, spec_dtype: str) -> str:
    if kind == "image":
        return "uint8"
    return f"{'a float' if np.dtype(spec_dtype).kind == 'f' else 'an integer'} dtype ({spec_dtype})"


def _bounds(value: Any, shape: tuple[int, ...], path: str, problems: list[str]) -> np.ndarray | None:
    if value is None:
        return None
    try:
        raw = np.asarray(value, dtype=object)
    except ValueError:
        raw = np.asarray([None], dtype=object)  # ragged nesting: reported below
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.reshape(-1)):
        problems.append(f"{path}: expected a number or a (nested) list of numbers, got {value!r}")
        return None
    array = raw.astype(np.float64)
    if array.ndim and array.shape != shape:
        problems.append(f"{path}: expected a number or shape {list(shape)}, got shape {list(array.shape)}")
        return None
    if not (np.abs(array) <= MAX_BOUND).all():
        problems.append(f"{path}: expected finite numbers within ±{MAX_BOUND:g}, got {value!r}")
        return None
    return np.broadcast_to(array, shape).copy()


def _first_violation(
    key: str, problem: str, expected: str, array: np.ndarray, bad: np.ndarray
) -> Violation | None:
    """A violation naming the first element of ``array`` where ``bad`` (same shape) is True, or None."""
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return Violation(key, problem, expected, f"{array[index]} at index {index}")


def _bound_violation(
    key: str, array: np.ndarray, low: np.ndarray | None, high: np.ndarray | None, lead: tuple[int, ...]
) -> Violation | None:
    """The first element of ``array`` (shape ``lead + bounds shape``) outside [low, high], allowing
    float rounding at the bound itself (a float32 copy of a float64 bound)."""
    low = np.full(array.shape[len(lead) :], -np.inf) if low is None else low
    high = np.full(array.shape[len(lead) :], np.inf) if high is None else high
    finite = np.isfinite(low) & np.isfinite(high)
    magnitude = np.maximum(
        np.abs(np.where(np.isfinite(low), low, 0)), np.abs(np.where(np.isfinite(high), high, 0))
    )
    eps = np.finfo(array.dtype).eps if array.dtype.kind == "f" else 0.0
    slack = BOUND_TOLERANCE * np.where(finite, high - low, 0.0) + eps * magnitude
    bad = (array < low - slack) | (array > high + slack)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    inner = index[len(lead) :]
    return Violation(
        key, "out of bounds", f"values in [{low[inner]}, {high[inner]}]", f"{array[index]} at index {index}"
    )


def _length(value: Any) -> int | None:
    """Rows of an array-like (its first dimension), or None for scalars and ragged nests."""
    try:
        array = np.asarray(value) if not isinstance(value, np.ndarray) else value
    except ValueError:
        return None
    return int(array.shape[0]) if array.ndim > 0 else None


def _positive_int(value: Any, path: str, problems: list[str], maximum: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{path}: expected a positive integer, got {value!r}")
        return None
    if maximum is not None and value > maximum:
        problems.append(f"{path}: expected at most {maximum}, got {value}")
        return None
    return value


def _shape(value: Any, path: str, problems: list[str]) -> tuple[int, ...] | None:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        problems.append(f"{path}: expected a list of positive integers, got {value!r}")
        return None
    return tuple(int(v) for v in value)


def _cell_values(
    value: Any,
    kind: str,
    shape: tuple[int, ...],
    num_values: int | None,
    path: str,
    problems: list[str],
) -> tuple[int, ...] | None:
    """``cell_values`` checked: one positive integer per entry of the last axis, each at most
    ``num_values``, their product (the values a cell takes) at most ``DISCRETE_VALUES``."""
    if value is None:
        return None
    where = f"{path}.cell_values"
    if kind != "discrete":
        problems.append(f"{where}: applies to discrete observations only, not {kind!r}")
        return None
    cells = _shape(value, where, problems)
    if cells is None:
        return None
    if not shape or len(cells) != shape[-1]:
        last = shape[-1] if shape else "none (the shape is [])"
        problems.append(
            f"{where}: expected one entry per element of the last axis ({last}), got {list(cells)}"
        )
    elif num_values is not None and max(cells) > num_values:
        problems.append(f"{where}: expected entries of at most num_values ({num_values}), got {list(cells)}")
    elif math.prod(cells) > DISCRETE_VALUES:
        problems.append(
            f"{where}: a cell takes prod(cell_values) = {math.prod(cells)} values; expected at most "
            f"{DISCRETE_VALUES} (the discrete id range)"
        )
    return cells


def _unknown_fields(
    data: Mapping[str, Any], allowed: tuple[str, ...], path: str, problems: list[str]
) -> None:
    for name in data:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}{name}: unknown field{hint}; expected one of {list(allowed)}")


@dataclass(frozen=True, eq=False)
class ObservationSpec:
    """One observation key. Bounds ``low``/``high`` are float64 arrays of ``shape`` (or None)."""

    kind: ObservationKind
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    num_values: int | None = None
    description: str = ""
    cell_values: tuple[int, ...] | None = None
    """``discrete`` only: the last axis is one cell (one symbol, e.g. a grid cell's object, colour
    and state), tokenized as one value: the mixed-radix number of its entries, entry k in
    ``[0, cell_values[k])``. None: every entry is a token of its own."""

    FIELDS = ("kind", "shape", "dtype", "low", "high", "num_values", "cell_values", "description")

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The shape of a ``proprio`` or ``discrete`` key's tokens in one timestep: ``shape``, or
        ``shape[:-1]`` with ``cell_values`` (one token per cell)."""
        return self.shape[:-1] if self.cell_values else self.shape

    @property
    def tokens(self) -> int:
        """Tokens per timestep of a ``proprio`` or ``discrete`` key: its elements, or its cells."""
        return math.prod(self.token_shape)

    def to_cells(self, array: np.ndarray) -> np.ndarray:
        """Entries ``(..., *shape)`` to one value per cell ``(..., *shape[:-1])`` (mixed radix,
        the last entry least significant); the array itself without ``cell_values``."""
        if not self.cell_values:
            return array
        radix = np.cumprod((1, *self.cell_values[:0:-1]))[::-1].astype(np.int64)  # (C,)
        return (np.asarray(array).astype(np.int64) * radix).sum(-1)

    def from_cells(self, cells: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_cells`: ``(..., *shape[:-1])`` to ``(..., *shape)``. A value
        of ``prod(cell_values)`` or more (a dynamics prediction outside the symbols) keeps its
        excess in the first part, out of its range, rather than wrapping into a valid cell."""
        if not self.cell_values:
            return cells
        parts, rest = [], np.asarray(cells).astype(np.int64)
        for radix in self.cell_values[:0:-1]:
            parts.append(rest % radix)
            rest = rest // radix
        return np.stack([rest, *parts[::-1]], axis=-1)

    @classmethod
    def parse(cls, data: Any, path: str, problems: list[str]) -> ObservationSpec | None:
        if not isinstance(data, Mapping):
            problems.append(f"{path}: expected an object, got {type(data).__name__}")
            return None
        _unknown_fields(data, cls.FIELDS, f"{path}.", problems)
        kind = data.get("kind")
        if kind not in OBSERVATION_KINDS:
            problems.append(f"{path}.kind: expected one of {list(OBSERVATION_KINDS)}, got {kind!r}")
            return None
        n = len(problems)
        if kind == "text":
            shape: tuple[int, ...] | None = _shape(data.get("shape", []), f"{path}.shape", problems)
            if shape:
                problems.append(
                    f"{path}.shape: a text observation is one string per timestep: expected [], got {list(shape)}"
                )
        else:
            if "shape" not in data:
                problems.append(f"{path}.shape: missing; expected a list of positive integers")
                return None
            shape = _shape(data["shape"], f"{path}.shape", problems)
        if shape is None:
            return None
        dtype = data.get("dtype", DEFAULT_DTYPES[kind])
        expected_dtypes = {
            "proprio": ("float16", "float32", "float64"),
            "image": ("uint8",),
            "text": ("str",),
            "discrete": ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32"),
        }[kind]
        if dtype not in expected_dtypes:
            problems.append(
                f"{path}.dtype: expected one of {list(expected_dtypes)} for kind {kind!r}, got {dtype!r}"
            )
        if kind == "image" and (len(shape) != 3 or shape[2] not in (1, 3)):
            problems.append(f"{path}.shape: expected [H, W, C] with C 1 or 3 for an image, got {list(shape)}")
        low = high = None
        num_values = None
        if kind == "proprio":
            low = _bounds(data.get("low"), shape, f"{path}.low", problems)
            high = _bounds(data.get("high"), shape, f"{path}.high", problems)
            if low is not None and high is not None and not (low < high).all():
                problems.append(
                    f"{path}: expected low < high everywhere, got low={low.tolist()} high={high.tolist()}"
                )
        else:
            for name in ("low", "high"):
                if data.get(name) is not None:
                    problems.append(f"{path}.{name}: bounds apply to proprio observations only, not {kind!r}")
        if kind == "discrete":
            num_values = _positive_int(
                data.get("num_values"), f"{path}.num_values", problems, DISCRETE_VALUES
            )
        elif data.get("num_values") is not None:
            problems.append(f"{path}.num_values: applies to discrete observations only, not {kind!r}")
        cell_values = _cell_values(data.get("cell_values"), kind, shape, num_values, path, problems)
        if len(problems) > n:
            return None
        return cls(kind, shape, dtype, low, high, num_values, str(data.get("description", "")), cell_values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.low is not None:
            out["low"] = self.low.tolist()
        if self.high is not None:
            out["high"] = self.high.tolist()
        if self.num_values is not None:
            out["num_values"] = self.num_values
        if self.cell_values is not None:
            out["cell_values"] = list(self.cell_values)
        if self.description:
            out["description"] = self.description
        return out

    def violations(self, key: str, value: Any, lead: tuple[int, ...]) -> list[Violation]:
        """Problems of ``value`` (shape ``lead + shape``) against this spec; empty when it matches."""
        expected_shape = str(lead + self.shape)
        if self.kind == "text":
            array = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
            if array.shape != lead:
                expected = f"one string per timestep, shape {lead}" if lead else "a single string"
                return [Violation(key, "wrong shape", expected, f"shape {array.shape}")]
            not_str = [x for x in array.reshape(-1) if not isinstance(x, str)]
            if not_str:
                return [Violation(key, "wrong type", "str", type(not_str[0]).__name__)]
            return []
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as error:
            return [
                Violation(key, "not an array", f"{self.dtype} array of shape {expected_shape}", str(error))
            ]
        if array.shape != lead + self.shape:
            return [Violation(key, "wrong shape", expected_shape, str(tuple(array.shape)))]
        if not _dtype_ok(self.kind, self.dtype, array):
            return [
                Violation(key, "wrong dtype", _dtype_expectation(self.kind, self.dtype), str(array.dtype))
            ]
        out: list[Violation] = []
        if array.dtype.kind == "f":
            violation = _first_violation(key, "non-finite value", "finite values", array, ~np.isfinite(array))
            if violation is not None:
                return [violation]
        if self.kind == "discrete":
            assert self.num_values is not None
            expected = f"integers in [0, {self.num_values})"
            violation = _first_violation(
                key, "out of range", expected, array, (array < 0) | (array >= self.num_values)
            )
            if violation is None and self.cell_values is not None:
                expected = f"a cell's entry k in [0, cell_values[k]) = {list(self.cell_values)}"
                violation = _first_violation(
                    key, "out of range", expected, array, array >= np.asarray(self.cell_values)
                )
            if violation is not None:
                out.append(violation)
        if self.low is not None or self.high is not None:
            violation = _bound_violation(key, array, self.low, self.high, lead)
            if violation is not None:
                out.append(violation)
        return out


@dataclass(frozen=True, eq=False)
class ActionSpec:
    """The action: ``continuous`` with float64 bounds arrays of ``shape``, or ``discrete`` choices."""

    kind: ActionKind
    shape: tuple[int, ...] = (1,)
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    num_choices: int | None = None
    description: str = ""

    FIELDS = ("kind", "shape", "low", "high", "num_choices", "dtype", "description")

    @property
    def size(self) -> int:
        """Action tokens per timestep (elements of ``shape``)."""
        return math.prod(self.shape)

    @property
    def dtype(self) -> str:
        return DEFAULT_DTYPES["continuous"] if self.kind == "continuous" else "int64"

    @classmethod
    def parse(cls, data: Any, path: str, problems: list[str]) -> ActionSpec | None:
        if not isinstance(data, Mapping):
            problems.append(f"{path}: expected an object, got {type(data).__name__}")
            return None
        _unknown_fields(data, cls.FIELDS, f"{path}.", problems)
        kind = data.get("kind")
        if kind not in ACTION_KINDS:
            problems.append(f"{path}.kind: expected one of {list(ACTION_KINDS)}, got {kind!r}")
            return None
        n = len(problems)
        shape = _shape(data.get("shape", [1]), f"{path}.shape", problems)
        if shape is None:
            return None
        low = high = None
        num_choices = None
        if kind == "continuous":
            for name in ("low", "high"):
                if data.get(name) is None:
                    problems.append(
                        f"{path}.{name}: missing; a continuous action needs bounds (a number or a list of shape {list(shape)})"
                    )
            low = _bounds(data.get("low"), shape, f"{path}.low", problems)
            high = _bounds(data.get("high"), shape, f"{path}.high", problems)
            if low is not None and high is not None and not (low < high).all():
                problems.append(
                    f"{path}: expected low < high everywhere, got low={low.tolist()} high={high.tolist()}"
                )
            if data.get("num_choices") is not None:
                problems.append(f"{path}.num_choices: applies to discrete actions only")
        else:
            num_choices = _positive_int(
                data.get("num_choices"), f"{path}.num_choices", problems, DISCRETE_VALUES
            )
        if data.get("dtype") not in (None, DEFAULT_DTYPES["continuous"] if kind == "continuous" else "int64"):
            problems.append(
                f"{path}.dtype: expected {'float32' if kind == 'continuous' else 'int64'} for a {kind} action, got {data.get('dtype')!r}"
            )
        if len(problems) > n:
            return None
        return cls(kind, shape, low, high, num_choices, str(data.get("description", "")))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.kind == "continuous":
            assert self.low is not None and self.high is not None
            out["low"], out["high"] = self.low.tolist(), self.high.tolist()
        else:
            out["num_choices"] = self.num_choices
        if self.description:
            out["description"] = self.description
        return out

    def violations(self, value: Any, lead: tuple[int, ...], key: str = "actions") -> list[Violation]:
        """Problems of actions ``value`` (shape ``lead + shape``); empty when they match."""
        try:
            array = np.asarray(value)
        except ValueError as error:
            return [Violation(key, "not an array", f"shape {lead + self.shape}", str(error))]
        expected_shape = str(lead + self.shape)
        if array.shape != lead + self.shape:
            return [Violation(key, "wrong shape", expected_shape, str(tuple(array.shape)))]
        if self.kind == "continuous":
            if array.dtype.kind != "f":
                return [Violation(key, "wrong dtype", "a float dtype", str(array.dtype))]
            violation = _first_violation(key, "non-finite value", "finite values", array, ~np.isfinite(array))
            if violation is not None:
                return [violation]
            assert self.low is not None and self.high is not None
            violation = _bound_violation(key, array, self.low, self.high, lead)
            return [violation] if violation is not None else []
        if array.dtype.kind not in "iub":
            return [Violation(key, "wrong dtype", "an integer dtype", str(array.dtype))]
        assert self.num_choices is not None
        expected = f"integers in [0, {self.num_choices})"
        violation = _first_violation(
            key, "out of range", expected, array, (array < 0) | (array >= self.num_choices)
        )
        return [violation] if violation is not None else []


@dataclass(frozen=True, eq=False)
class EmbodimentSpec:
    """A robot: named observations (iterated in sorted key order), one action, a control rate."""

    name: str
    observations: dict[str, ObservationSpec]
    action: ActionSpec
    control_hz: float
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("name", "observations", "action", "control_hz", "description", "metadata")

    @classmethod
    def from_dict(cls, data: Any) -> EmbodimentSpec:
        """Validate and load; raises :class:`SpecError` listing every problem with its field path."""
        if not isinstance(data, Mapping):
            raise SpecError("?", [f"spec: expected a JSON object, got {type(data).__name__}"])
        name = data.get("name")
        problems: list[str] = []
        if not isinstance(name, str) or not name:
            problems.append(f"name: expected a non-empty string, got {name!r}")
            name = str(name)
        _unknown_fields(data, cls.FIELDS, "", problems)
        observations: dict[str, ObservationSpec] = {}
        raw_obs = data.get("observations")
        if not isinstance(raw_obs, Mapping) or not raw_obs:
            problems.append(
                f"observations: expected a non-empty object of key -> observation, got {raw_obs!r}"
            )
        else:
            for key in sorted(raw_obs, key=str):
                if not isinstance(key, str) or not KEY_PATTERN.match(key):
                    problems.append(f"observations.{key}: expected a key of letters, digits, '_', '-', '/'")
                    continue
                parsed = ObservationSpec.parse(raw_obs[key], f"observations.{key}", problems)
                if parsed is not None:
                    observations[key] = parsed
        if "action" not in data:
            problems.append("action: missing; expected an object with kind 'continuous' or 'discrete'")
            action = None
        else:
            action = ActionSpec.parse(data["action"], "action", problems)
        control_hz = data.get("control_hz")
        if isinstance(control_hz, bool) or not isinstance(control_hz, (int, float)) or not control_hz > 0:
            problems.append(f"control_hz: expected a positive number, got {control_hz!r}")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, Mapping):
            problems.append(f"metadata: expected an object, got {type(metadata).__name__}")
        else:
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as error:
                problems.append(f"metadata: expected plain JSON values, got {error}")
        if problems:
            raise SpecError(name, problems)
        assert action is not None and isinstance(control_hz, (int, float))
        return cls(
            name, observations, action, float(control_hz), str(data.get("description", "")), dict(metadata)
        )

    @classmethod
    def from_json(cls, text: str) -> EmbodimentSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError("?", [f"spec: not valid JSON ({error})"]) from error
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> EmbodimentSpec:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a JSON file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"embodiment spec {path}: {what}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except SpecError as error:
            raise SpecError(error.name, error.problems, source=path) from None
        except UnicodeDecodeError as error:
            raise SpecError("?", [f"spec: expected UTF-8 JSON text ({error})"], source=path) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "control_hz": self.control_hz,
            "observations": {k: v.to_dict() for k, v in sorted(self.observations.items())},
            "action": self.action.to_dict(),
        }
        if self.description:
            out["description"] = self.description
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbodimentSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        # equal specs have equal names; hashing the name keeps hash consistent with __eq__
        return hash(self.name)

    @classmethod
    def from_gymnasium(
        cls, env: Any, name: str | None = None, control_hz: float | None = None
    ) -> EmbodimentSpec:
        """The spec of a gymnasium environment (or its ``(observation_space, action_space)``):
        ``Box``/``Discrete``/``MultiDiscrete``/``MultiBinary``/``Text`` spaces, in ``Dict`` and
        ``Tuple`` nests (keys ``a/b``, ``0``), one ``Box``/``Discrete``/``MultiDiscrete``/
        ``MultiBinary`` action. A space that cannot be expressed (``Graph``, ``Sequence``, an
        action ``Box`` with infinite bounds, ...) raises :class:`SpecError` naming it.
        See :mod:`gato_like.tokenizers.gym_spaces`."""
        from gato_like.tokenizers.gym_spaces import SpaceMapping

        return SpaceMapping.of(env, name=name, control_hz=control_hz).spec

    def differences(
        self,
        other: EmbodimentSpec,
        ours: str = "this spec",
        theirs: str = "the other",
        body_only: bool = False,
    ) -> list[str]:
        """What differs between two specs, one line per field (empty when they are equal).
        ``body_only``: compare the observations and the action only (what a policy reads and
        emits), not the name, control rate, description or metadata."""
        if self == other:
            return []
        mine, yours = set(self.observations), set(other.observations)
        detail = []
        if mine != yours:
            detail.append(
                f"observation keys: {ours}: {sorted(mine)}, {theirs}: {sorted(yours)}"
                + (f" (missing from {theirs}: {sorted(mine - yours)})" if mine - yours else "")
                + (f" (not in {ours}: {sorted(yours - mine)})" if yours - mine else "")
            )
        for key in sorted(mine & yours):
            if (
                self.observations[key].to_dict() != other.observations[key].to_dict()
            ):  # eq=False: by value here
                detail.append(
                    f"obs.{key}: {ours} says {self.observations[key].to_dict()}, {theirs} "
                    f"{other.observations[key].to_dict()}"
                )
        if self.action.to_dict() != other.action.to_dict():
            detail.append(f"action: {ours} says {self.action.to_dict()}, {theirs} {other.action.to_dict()}")
        if body_only:
            return detail
        if self.name != other.name:
            detail.append(f"name: {ours} says {self.name!r}, {theirs} {other.name!r}")
        if self.control_hz != other.control_hz:
            detail.append(f"control_hz: {ours} says {self.control_hz:g}, {theirs} {other.control_hz:g}")
        return detail or ["description or metadata"]

    def keys_by_kind(self, kind: str) -> list[str]:
        """Observation keys of one kind, sorted."""
        return sorted(k for k, v in self.observations.items() if v.kind == kind)

    def _key_violations(self, observations: Mapping[str, Any], prefix: str = "") -> list[Violation]:
        out = [
            Violation(prefix + k, "missing key", "present", "absent")
            for k in sorted(self.observations)
            if k not in observations
        ]
        out += [
            Violation(prefix + k, "unexpected key", f"one of {sorted(self.observations)}", "present")
            for k in sorted(map(str, observations))
            if k not in self.observations
        ]
        return out

    def check_step(self, observation: Mapping[str, Any]) -> None:
        """One timestep's observation ``{key: array of the key's shape}``; raises
        :class:`SpecMismatchError` naming every violation."""
        if not isinstance(observation, Mapping):
            raise TypeError(
                f"observation: expected a mapping of key -> array, got {type(observation).__name__}"
            )
        violations = self._key_violations(observation)
        for key, spec in sorted(self.observations.items()):
            if key in observation:
                violations += spec.violations(key, observation[key], ())
        if violations:
            raise SpecMismatchError(self.name, violations, what="observation")

    def check_episode(self, observations: Mapping[str, Any], actions: Any | None) -> int:
        """Arrays ``(T, ...)`` per key and actions ``(T, ...)`` or ``(T - 1, ...)`` (the last step
        awaiting its action). Returns T; raises :class:`SpecMismatchError` naming every violation."""
        if not isinstance(observations, Mapping):
            raise TypeError(
                f"observations: expected a mapping of key -> (T, ...) array, got {type(observations).__name__}"
            )
        violations = self._key_violations(observations, prefix="obs.")
        lengths = [_length(v) for k, v in observations.items() if k in self.observations]
        steps = max((n for n in lengths if n is not None), default=0)
        if steps == 0:
            violations.append(Violation("obs", "empty episode", "at least one timestep", "no timesteps"))
        for key, spec in sorted(self.observations.items()):
            if key in observations:
                violations += spec.violations(f"obs.{key}", observations[key], (steps,))
        if actions is not None and steps:
            rows = _length(actions)
            if rows is None or rows not in (steps, steps - 1):
                got = "not an array of rows" if rows is None else f"{rows} rows"
                expected = f"{steps} or {steps - 1} rows (one per timestep, the last may await its action)"
                violations.append(Violation("actions", "wrong length", expected, got))
            else:
                violations += self.action.violations(actions, (rows,))
        if violations:
            raise SpecMismatchError(self.name, violations)
        return steps
