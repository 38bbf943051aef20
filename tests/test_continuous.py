"""ContinuousTokenizer against values computed by hand from the paper's formula.

F(x) = sgn(x) log(|x| mu + 1) / log(M mu + 1), mu = 100, M = 256, log(25601) = 10.150387...
bin = floor((F + 1) / 2 * 1024), clipped to 1023; id = V + bin.
"""

import math
import pickle

import numpy as np
import pytest

from gato_like.tokenizers import ContinuousTokenizer

V = 32000


@pytest.mark.parametrize(
    ("x", "expected_bin"),
    [
        (0.0, 512),  # F = 0 -> (0 + 1) / 2 * 1024 = 512.0
        (1.0, 744),  # F = log(101) / log(25601) = 0.454674 -> 744.79
        (-1.0, 279),  # -0.454674 -> 279.21
        (0.5, 710),  # log(51) / log(25601) = 0.387357 -> 710.33
        (10.0, 860),  # log(1001) / ... = 0.680640 -> 860.49
        (-10.0, 163),
        (0.001, 516),  # log(1.1) / ... = 0.009390 -> 516.81
        (255.9, 1023),  # F = 0.99996 -> 1023.98
        (256.0, 1023),  # F = 1 exactly -> 1024 -> clipped to the last bin
        (1000.0, 1023),  # beyond M: F > 1, clipped to 1
        (-1e6, 0),  # far below -M: clipped to -1 -> bin 0
    ],
)
def test_mu_law_bins_match_hand_computed_values(x: float, expected_bin: int) -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=V)
    assert tokenizer.encode(np.array([x])).tolist() == [V + expected_bin]


def test_bin_edges_without_mu_law() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=0, mu_law=False)
    # an edge -1 + 2k/1024 belongs to bin k; 1.0 to the last bin
    values = np.array([-1.0, -2 / 1024, 0.0, 1 / 1024, 2 / 1024, 0.5, 1.0 - 1e-12, 1.0])
    assert tokenizer.encode(values).tolist() == [0, 511, 512, 512, 513, 768, 1023, 1023]


def test_decode_is_bin_centre_then_inverse_mu_law() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=V)
    decoded = tokenizer.decode(np.array([V + 512, V + 511, V + 744, V + 1023, V]))
    log_mm = math.log(25601.0)
    expected = [
        (math.exp(log_mm / 1024) - 1) / 100,  # centre of bin 512 is 1/1024
        -(math.exp(log_mm / 1024) - 1) / 100,
        (math.exp(log_mm * (-1 + 1489 / 1024)) - 1) / 100,  # centre of bin 744 = -1 + 1489/1024
        (math.exp(log_mm * 1023 / 1024) - 1) / 100,
        -(math.exp(log_mm * 1023 / 1024) - 1) / 100,
    ]
    np.testing.assert_allclose(decoded, expected, rtol=1e-12)
    assert decoded[3] == pytest.approx(253.4748, abs=1e-4)


def test_round_trip_stays_within_one_bin() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=V)
    x = np.random.default_rng(0).normal(scale=20.0, size=(64, 7)).clip(-250, 250)
    ids = tokenizer.encode(x)
    assert ids.shape == (64 * 7,) and ids.dtype == np.int64
    assert ((ids >= V) & (ids < V + 1024)).all()
    # same bin again after decoding, and the companded error is at most half a bin
    assert (tokenizer.encode(tokenizer.decode(ids)) == ids).all()
    err = np.abs(tokenizer.companded(tokenizer.decode(ids)) - tokenizer.companded(x.reshape(-1)))
    assert err.max() <= 1 / 1024 + 1e-12


def test_row_major_flattening() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=0)
    x = np.array([[0.0, 256.0], [-256.0, 1.0]])
    assert tokenizer.encode(x).tolist() == [512, 1023, 0, 744]


def test_unit_range_values_outside_are_an_error_not_clipped() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=0, mu_law=False)
    with pytest.raises(ValueError, match=r"expected values in \[-1, 1\], got 1.5 at index \(1,\)"):
        tokenizer.encode(np.array([0.2, 1.5]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="expected finite values"):
        ContinuousTokenizer().encode(np.array([[0.0, bad]]))


def test_wrong_dtypes_and_ids_are_rejected() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=V)
    with pytest.raises(TypeError, match="real numeric array"):
        tokenizer.encode(np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"expected ids in \[32000, 33024\), got 5"):
        tokenizer.decode(np.array([V, 5]))
    with pytest.raises(TypeError, match="integer ids"):
        tokenizer.decode(np.array([32000.0]))


def test_picklable() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=7, mu_law=False)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert repr(clone) == repr(tokenizer)
    assert clone.encode(np.array([0.3])).tolist() == tokenizer.encode(np.array([0.3])).tolist()


def test_bin_edges_are_the_uniform_grid_that_encode_uses() -> None:
    tokenizer = ContinuousTokenizer(vocab_offset=0, mu_law=False, bins=1024)
    edges = tokenizer.bin_edges()
    assert edges.shape == (1025,) and edges[0] == -1.0 and edges[-1] == 1.0
    # each interior edge opens its bin; just below it (beyond float rounding of y + 1) is the previous bin
    inner = edges[1:-1]
    assert tokenizer.encode(inner).tolist() == list(range(1, 1024))
    assert tokenizer.encode(inner - 1e-12).tolist() == list(range(0, 1023))
