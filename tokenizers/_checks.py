"""Input checks shared by the tokenizers: each error names what was wrong and what was expected."""

from __future__ import annotations

import numpy as np


def as_numeric_array(values: object, *, what: str) -> np.ndarray:
    """``values`` as a numpy array of a real numeric dtype (bool, int, uint or float).

    Raises ``TypeError`` for strings, objects and complex numbers.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what}: expected a real numeric array, got dtype {array.dtype}")
    return array


def as_ids(values: object) -> np.ndarray:
    """``values`` as an array; an empty list becomes an empty int64 array (not float64)."""
    array = np.asarray(values)
    return array.astype(np.int64) if array.size == 0 and array.dtype.kind == "f" else array


def check_finite(array: np.ndarray, *, what: str) -> None:
    """Raise ``ValueError`` naming the first NaN/Inf element, if any."""
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what}: expected finite values, got {array[index]} at index {index} "
            f"({int(bad.sum())} non-finite value(s) in all)"
        )
