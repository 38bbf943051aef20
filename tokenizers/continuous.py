"""Continuous values (proprioception, torques, scaled actions) to ids, Gato section 2.1.

Encoding, for an array of any shape (flattened row-major)::

    y = sgn(x) * log(|x| * mu + 1) / log(M * mu + 1)      mu-law companding (skipped if mu_law=False)
    y = clip(y, -1, 1)                                    |x| > M maps to the end bins (documented)
    bin = min(floor((y + 1) / 2 * bins), bins - 1)        1024 uniform bins on [-1, 1]
    id = vocab_offset + bin

Decoding maps a bin to its centre ``-1 + (2 * bin + 1) / bins`` and inverts the mu-law.
With ``mu_law=False`` the values must already lie in [-1, 1] (actions after scaling by the
embodiment's bounds); values outside are an error rather than silently clipped.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from gato_like.tokenizers._checks import as_ids as _as_ids
from gato_like.tokenizers._checks import as_numeric_array, check_finite
from gato_like.tokenizers.vocab import CONTINUOUS_BINS, GATO_TEXT_VOCAB_SIZE, MU, M, bin_centres, bin_of

#: Slack allowed on [-1, 1] when ``mu_law=False`` (float rounding of a scaled bound).
UNIT_RANGE_TOLERANCE = 1e-6


class ContinuousTokenizer:
    """Mu-law + uniform binning of continuous values into ids ``[vocab_offset, vocab_offset + bins)``.

    Args:
        vocab_offset: first id of the continuous range (the text vocabulary size V).
        mu: mu-law ``mu`` (Gato: 100).
        m: mu-law ``M`` (Gato: 256); ``|x| >= M`` lands in the end bins.
        bins: number of uniform bins on [-1, 1] (Gato: 1024).
        mu_law: apply mu-law companding; ``False`` for values already in [-1, 1].
    """

    def __init__(
        self,
        vocab_offset: int = GATO_TEXT_VOCAB_SIZE,
        mu: float = MU,
        m: float = M,
        bins: int = CONTINUOUS_BINS,
        mu_law: bool = True,
    ) -> None:
        if operator.index(vocab_offset) < 0:
            raise ValueError(f"vocab_offset: expected >= 0, got {vocab_offset}")
        if not (math.isfinite(mu) and math.isfinite(m) and mu > 0 and m > 0):
            raise ValueError(f"mu and m: expected finite numbers > 0, got mu={mu}, m={m}")
        if operator.index(bins) < 2:
            raise ValueError(f"bins: expected an integer >= 2, got {bins}")
        self.vocab_offset = int(vocab_offset)
        self.mu = float(mu)
        self.m = float(m)
        self.bins = int(bins)
        self.mu_law = bool(mu_law)

    def __repr__(self) -> str:
        return (
            f"ContinuousTokenizer(vocab_offset={self.vocab_offset}, mu={self.mu}, m={self.m}, "
            f"bins={self.bins}, mu_law={self.mu_law})"
        )

    def companded(self, values: np.ndarray) -> np.ndarray:
        """The value in [-1, 1] that gets binned (after mu-law and clipping). Same shape, float64."""
        x = as_numeric_array(values, what="ContinuousTokenizer.encode").astype(np.float64)
        check_finite(x, what="ContinuousTokenizer.encode")
        if self.mu_law:
            y = np.sign(x) * np.log1p(np.abs(x) * self.mu) / np.log1p(self.m * self.mu)
            return np.clip(y, -1.0, 1.0)
        outside = np.abs(x) > 1.0 + UNIT_RANGE_TOLERANCE
        if outside.any():
            index = tuple(int(i) for i in np.argwhere(outside)[0])
            raise ValueError(
                "ContinuousTokenizer.encode (mu_law=False): expected values in [-1, 1], "
                f"got {x[index]} at index {index}; scale by the embodiment's bounds first"
            )
        return np.clip(x, -1.0, 1.0)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Values of any shape ``(...)`` to ids of shape ``(prod(...),)``, int64, row-major."""
        return bin_of(self.companded(values).reshape(-1), self.bins) + self.vocab_offset

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids of any shape to float64 values of the same shape (bin centre, inverse mu-law)."""
        ids = _as_ids(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ContinuousTokenizer.decode: expected integer ids, got dtype {ids.dtype}")
        bins = ids.astype(np.int64) - self.vocab_offset
        bad = (bins < 0) | (bins >= self.bins)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"ContinuousTokenizer.decode: expected ids in [{self.vocab_offset}, "
                f"{self.vocab_offset + self.bins}), got {int(ids[index])} at index {index}"
            )
        y = bin_centres(self.bins)[bins]
        if not self.mu_law:
            return y
        return np.sign(y) * np.expm1(np.abs(y) * np.log1p(self.m * self.mu)) / self.mu

    def bin_edges(self) -> np.ndarray:
        """The ``bins + 1`` edges of the uniform bins on [-1, 1] (in companded space)."""
        return np.linspace(-1.0, 1.0, self.bins + 1)
