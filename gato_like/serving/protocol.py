"""The wire protocol of the policy server: msgpack frames, arrays as dtype + shape + raw bytes.

Torch-free on purpose (numpy, msgpack and the standard library only): the light client imports it.
``docs/protocol.md`` is the reference for other languages; this module is its Python twin.

Every frame is one binary WebSocket message holding one msgpack map with a string ``"type"``.
An n-d array is the map ``{"dtype": str, "shape": [int, ...], "data": bin}`` with ``data`` the
C-order, little-endian bytes of the array; only the dtypes of :data:`DTYPES` are accepted.
Nothing is ever unpickled: :func:`decode_frame` uses msgpack with every extension type refused and
then checks the message against the schema of its type, raising :class:`ProtocolError` that names
the field that was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; ``hello.version`` must equal it."""

#: dtype name on the wire -> numpy dtype (always little-endian).
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}
MAX_NDIM = 8

# Error codes. ``fatal`` errors are followed by the server closing the connection.
BAD_FRAME = "BAD_FRAME"  # not msgpack, not a map, too large, extension types
BAD_MESSAGE = "BAD_MESSAGE"  # a field missing, of the wrong type or unknown
UNKNOWN_TYPE = "UNKNOWN_TYPE"  # "type" names no message kind
VERSION_MISMATCH = "VERSION_MISMATCH"  # hello.version is not PROTOCOL_VERSION (fatal)
HANDSHAKE_REQUIRED = "HANDSHAKE_REQUIRED"  # anything but hello before the welcome
UNKNOWN_SESSION = "UNKNOWN_SESSION"  # hello.session names no live session (fatal)
SESSION_LIMIT = "SESSION_LIMIT"  # the server holds max_sessions sessions (fatal)
SESSION_EXPIRED = "SESSION_EXPIRED"  # idle too long, or taken over by another connection (fatal)
UNKNOWN_TASK = "UNKNOWN_TASK"  # reset names no task or embodiment the model knows
INVALID_PROMPT = "INVALID_PROMPT"  # a reset prompt or goal that does not fit the spec or the context
NOT_RESET = "NOT_RESET"  # a step before any reset
INVALID_OBSERVATION = "INVALID_OBSERVATION"  # the observation does not match the spec
STALE_STEP = "STALE_STEP"  # a step index older than the last one answered
STEP_GAP = "STEP_GAP"  # a step index ahead of the next expected one
BUSY = "BUSY"  # a reset or another step arrived while a step is in flight
OVERLOADED = "OVERLOADED"  # the queue is full; retry after retry_after_ms
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the step waited past its deadline; not applied
INTERNAL = "INTERNAL"  # a server bug; the session is closed (fatal)
HELLO_TIMEOUT = "HELLO_TIMEOUT"  # no successful hello within the server's hello_timeout_s (fatal)
CONNECTION_LIMIT = "CONNECTION_LIMIT"  # max_pending_connections connections await their hello (fatal)
SLOW_CONSUMER = "SLOW_CONSUMER"  # close reason only: replies left unread past send_timeout_s
TOO_MANY_ERRORS = "TOO_MANY_ERRORS"  # more than max_errors error replies within errors_window_s (fatal)
ERROR_CODES = (
    BAD_FRAME,
    BAD_MESSAGE,
    UNKNOWN_TYPE,
    VERSION_MISMATCH,
    HANDSHAKE_REQUIRED,
    UNKNOWN_SESSION,
    SESSION_LIMIT,
    SESSION_EXPIRED,
    UNKNOWN_TASK,
    INVALID_PROMPT,
    NOT_RESET,
    INVALID_OBSERVATION,
    STALE_STEP,
    STEP_GAP,
    BUSY,
    OVERLOADED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    HELLO_TIMEOUT,
    CONNECTION_LIMIT,
    SLOW_CONSUMER,
    TOO_MANY_ERRORS,
)


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol.

    Attributes mirror the ``error`` frame: ``code`` (one of :data:`ERROR_CODES`), ``message``,
    ``key`` (the path of the offending field, e.g. ``obs.pixels.shape``), ``expected``, ``got``,
    ``fatal`` and ``violations`` (``[{key, problem, expected, got}]`` for observations).
    """

    def __init__(
        self,
        code: str,
        message: str,
        key: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        fatal: bool = False,
        violations: list[dict[str, str]] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.key = key
        self.expected = expected
        self.got = got
        self.fatal = fatal
        self.violations = violations or []
        self.retry_after_ms = retry_after_ms

    def to_message(self, request_id: int | None = None, step: int | None = None) -> dict[str, Any]:
        """The ``error`` message for this problem (``id``/``step`` echo the request's)."""
        out: dict[str, Any] = {
            "type": "error",
            "code": self.code,
            "message": self.message,
            "key": self.key,
            "expected": self.expected,
            "got": self.got,
            "fatal": self.fatal,
        }
        if self.violations:
            out["violations"] = self.violations
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = int(self.retry_after_ms)
        if request_id is not None:
            out["id"] = request_id
        if step is not None:
            out["step"] = step
        return out


@dataclass(frozen=True)
class Limits:
    """Size limits every decoder enforces (the server announces its own in ``welcome.limits``)."""

    max_frame_bytes: int = 8 << 20
    """Largest accepted frame (msgpack bytes)."""
    max_array_bytes: int = 4 << 20
    """Largest accepted array payload (``data`` bytes)."""
    max_string_bytes: int = 64 << 10
    """Largest accepted string (UTF-8 bytes)."""
    max_keys: int = 256
    """Most entries in one map (observation keys, message fields)."""
    max_prompt_steps: int = 1024
    """Most timesteps in a reset prompt."""

    def to_dict(self) -> dict[str, int]:
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_array_bytes": self.max_array_bytes,
            "max_string_bytes": self.max_string_bytes,
            "max_keys": self.max_keys,
            "max_prompt_steps": self.max_prompt_steps,
        }


DEFAULT_LIMITS = Limits()


# -- arrays ------------------------------------------------------------------------------------


def encode_array(array: Any) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` of an array-like (C order, little-endian bytes)."""
    a = np.asarray(array)
    name = a.dtype.name
    if name not in DTYPES:
        raise ProtocolError(
            BAD_MESSAGE, f"dtype {a.dtype} cannot be sent", expected=f"one of {sorted(DTYPES)}", got=name
        )
    data = np.ascontiguousarray(a, dtype=DTYPES[name]).tobytes()
    return {"dtype": name, "shape": list(a.shape), "data": data}


def is_array(value: Any) -> bool:
    """Whether a decoded value is meant as an array (a map with a ``dtype`` key)."""
    return isinstance(value, dict) and "dtype" in value


def decode_array(value: Any, key: str, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A read-only numpy array from its wire map; :class:`ProtocolError` naming ``key`` otherwise."""
    if not isinstance(value, dict):
        raise ProtocolError(BAD_MESSAGE, f"{key}: expected an array map", key, "{dtype, shape, data}", _kind(value))  # fmt: skip
    extra = sorted(set(value) - {"dtype", "shape", "data"})
    if extra:
        raise ProtocolError(BAD_MESSAGE, f"{key}: unknown array field {extra[0]!r}", f"{key}.{extra[0]}", "dtype, shape, data", str(extra))  # fmt: skip
    for name in ("dtype", "shape", "data"):
        if name not in value:
            raise ProtocolError(BAD_MESSAGE, f"{key}.{name}: missing", f"{key}.{name}", "present", "absent")
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(
            BAD_MESSAGE,
            f"{key}.dtype: not an accepted dtype",
            f"{key}.dtype",
            f"one of {sorted(DTYPES)}",
            repr(dtype)[:80],
        )
    shape = value["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape)
    ):
        raise ProtocolError(
            BAD_MESSAGE,
            f"{key}.shape: not a valid shape",
            f"{key}.shape",
            f"a list of at most {MAX_NDIM} non-negative integers",
            repr(shape)[:80],
        )
    data = value["data"]
    if not isinstance(data, bytes):
        raise ProtocolError(BAD_MESSAGE, f"{key}.data: expected bin bytes", f"{key}.data", "bin", _kind(data))
    if len(data) > limits.max_array_bytes:
        raise ProtocolError(
            BAD_FRAME,
            f"{key}: array too large",
            key,
            f"at most {limits.max_array_bytes} bytes",
            f"{len(data)} bytes",
        )
    np_dtype = DTYPES[dtype]
    need = math.prod(shape) * np_dtype.itemsize
    if need > limits.max_array_bytes:
        raise ProtocolError(
            BAD_FRAME,
            f"{key}: array too large",
            key,
            f"at most {limits.max_array_bytes} bytes",
            f"{need} bytes",
        )
    if len(data) != need:
        raise ProtocolError(
            BAD_MESSAGE,
            f"{key}.data: byte count does not match dtype and shape",
            f"{key}.data",
            f"{need} bytes ({dtype} {shape})",
            f"{len(data)} bytes",
        )
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return array.astype(np_dtype.newbyteorder("="), copy=False)


# -- frames ------------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(BAD_FRAME, f"msgpack extension type {code} is not accepted", None, "no extension types", f"ext {code}")  # fmt: skip


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """One frame: the msgpack bytes of a message whose arrays are already wire maps."""
    return bytes(msgpack.packb(message, use_bin_type=True, datetime=False))


def unpack_frame(frame: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """msgpack bytes -> a map with a string ``type``; :class:`ProtocolError` (``BAD_FRAME``) otherwise."""
    if isinstance(frame, str):
        raise ProtocolError(BAD_FRAME, "text frame: frames are binary msgpack", None, "a binary frame", "a text frame")  # fmt: skip
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_FRAME, "not bytes", None, "bytes", _kind(frame))
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(BAD_FRAME, "frame too large", None, f"at most {limits.max_frame_bytes} bytes", f"{len(frame)} bytes")  # fmt: skip
    try:
        message = msgpack.unpackb(
            bytes(frame),
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_string_bytes,
            max_bin_len=limits.max_frame_bytes,  # arrays: checked by decode_array, which names the key
            max_array_len=max(limits.max_keys, MAX_NDIM, limits.max_prompt_steps),
            max_map_len=limits.max_keys,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as error:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError(BAD_FRAME, f"not a valid msgpack frame ({type(error).__name__}: {str(error)[:120]})", None, "one msgpack map", "undecodable bytes") from None  # fmt: skip
    if not isinstance(message, dict):
        raise ProtocolError(BAD_FRAME, "a frame must hold one msgpack map", None, "map", _kind(message))
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "type: missing or not a string", "type", "a string", _kind(kind))
    return message


# -- messages ----------------------------------------------------------------------------------

_INT = "int"
_STR = "str"
_BOOL = "bool"
_NUM = "number"
_MAP = "map"
_OBS = "observation"
_PROMPT = "prompt"

#: Client-to-server messages: field -> (type, required). ``id`` is optional on every message.
CLIENT_MESSAGES: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {
        "version": (_INT, True),
        "session": (_STR, False),
        "client": (_STR, False),
    },
    "reset": {
        "task": (_STR, False),
        "embodiment": (_STR, False),
        "prompt": (_PROMPT, False),
        "goal": (_OBS, False),
        "temperature": (_NUM, False),
    },
    "step": {"step": (_INT, True), "obs": (_OBS, True), "deadline_ms": (_NUM, False)},
    "ping": {"t": (_NUM, False)},
    "bye": {},
}


@dataclass
class Message:
    """A decoded client message: ``type``, ``id`` (or None) and checked ``fields``; observation
    values are numpy arrays (or ``str`` for text keys)."""

    type: str
    id: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def decode_observation(value: Any, key: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """``{name: array map | str}`` -> ``{name: np.ndarray | str}``."""
    if not isinstance(value, dict):
        raise ProtocolError(BAD_MESSAGE, f"{key}: expected a map of observation key -> array or string", key, "map", _kind(value))  # fmt: skip
    out: dict[str, Any] = {}
    for name, item in value.items():
        path = f"{key}.{name}"
        if isinstance(item, str):
            out[name] = item
        elif isinstance(item, dict):
            out[name] = decode_array(item, path, limits)
        elif isinstance(item, list) and all(isinstance(s, str) for s in item):
            out[name] = np.asarray(item, dtype=object)  # text per timestep (prompts)
        else:
            raise ProtocolError(BAD_MESSAGE, f"{path}: expected an array map or a string", path, "array map or str", _kind(item))  # fmt: skip
    return out


def _check(value: Any, kind: str, path: str, limits: Limits) -> Any:
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 62) < value < 1 << 62:
            raise ProtocolError(BAD_MESSAGE, f"{path}: expected an integer", path, "int", _kind(value))
        return value
    if kind == _NUM:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(BAD_MESSAGE, f"{path}: expected a finite number", path, "int or float", _kind(value))  # fmt: skip
        return value
    if kind == _STR:
        if not isinstance(value, str):
            raise ProtocolError(BAD_MESSAGE, f"{path}: expected a string", path, "str", _kind(value))
        return value
    if kind == _OBS:
        return decode_observation(value, path, limits)
    if kind == _PROMPT:
        if not isinstance(value, dict) or set(value) != {"obs", "actions"}:
            got = sorted(value) if isinstance(value, dict) else _kind(value)
            raise ProtocolError(BAD_MESSAGE, f"{path}: expected a map with keys obs and actions", path, "{obs, actions}", str(got))  # fmt: skip
        return {
            "obs": decode_observation(value["obs"], f"{path}.obs", limits),
            "actions": decode_array(value["actions"], f"{path}.actions", limits),
        }
    raise AssertionError(kind)


def parse_message(message: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check a client message against its schema; :class:`ProtocolError` names the first problem."""
    kind = message.get("type")
    if kind not in CLIENT_MESSAGES:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {str(kind)[:40]!r}", "type", f"one of {sorted(CLIENT_MESSAGES)}", repr(kind)[:60])  # fmt: skip
    schema = CLIENT_MESSAGES[kind]
    request_id = message.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 <= request_id < 1 << 63):  # fmt: skip
        raise ProtocolError(BAD_MESSAGE, "id: expected a non-negative integer", "id", "uint", _kind(request_id))  # fmt: skip
    for name in message:
        if name not in schema and name not in ("type", "id"):
            raise ProtocolError(BAD_MESSAGE, f"{name}: unknown field of a {kind} message", str(name), f"one of {sorted(schema)}", str(name)[:60])  # fmt: skip
    fields: dict[str, Any] = {}
    for name, (field_kind, required) in schema.items():
        if name not in message or message[name] is None:
            if required:
                raise ProtocolError(BAD_MESSAGE, f"{name}: missing from a {kind} message", name, field_kind, "absent")  # fmt: skip
            continue
        fields[name] = _check(message[name], field_kind, name, limits)
    return Message(kind, request_id, fields)


def decode_frame(frame: Any, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Bytes -> a checked client :class:`Message`, or :class:`ProtocolError` (never anything else)."""
    return parse_message(unpack_frame(frame, limits), limits)


def encode_observation(observation: Mapping[str, Any]) -> dict[str, Any]:
    """``{key: array | str}`` -> wire values (strings stay strings, arrays become array maps)."""
    out: dict[str, Any] = {}
    for key, value in observation.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, np.ndarray) and value.dtype == object:
            out[key] = [str(v) for v in value.reshape(-1)]
        elif isinstance(value, np.str_):
            out[key] = str(value)
        else:
            out[key] = encode_array(value)
    return out


# -- spec helpers (torch-free) -----------------------------------------------------------------


def example_observation(spec: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
    """A random observation that satisfies an embodiment spec given as its JSON dict (as in
    ``welcome.specs``): uniform within bounds (proprio without bounds: standard normal), random
    pixels, random discrete values, a short text."""
    rng = rng or np.random.default_rng(0)
    out: dict[str, Any] = {}
    for key, obs in spec["observations"].items():
        shape = tuple(obs.get("shape", []))
        kind = obs["kind"]
        if kind == "text":
            out[key] = "go to the red ball"
        elif kind == "image":
            out[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif kind == "discrete":  # a cell's part k below cell_values[k] where the spec has them
            high = obs.get("cell_values") or obs["num_values"]
            out[key] = rng.integers(0, high, shape).astype(obs.get("dtype", "int64"))
        else:
            low, high = obs.get("low"), obs.get("high")
            if low is not None and high is not None:
                value = rng.uniform(np.asarray(low), np.asarray(high), shape)
            else:
                value = rng.standard_normal(shape)
                if low is not None:
                    value = np.maximum(value, low)
                if high is not None:
                    value = np.minimum(value, high)
            out[key] = value.astype(obs.get("dtype", "float32"))
    return out
