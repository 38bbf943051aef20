import pickle

import numpy as np
import pytest

from gato_like.tokenizers import DiscreteTokenizer, ImageTokenizer, TextTokenizer, patch_position_intervals
from gato_like.tokenizers.text_corpus import babyai_mission


def test_discrete_ids_have_their_own_range() -> None:
    tokenizer = DiscreteTokenizer(vocab_offset=33024, num_values=1024)
    ids = tokenizer.encode(np.array([[0, 3], [1023, 7]], dtype=np.int64))
    assert ids.tolist() == [33024, 33027, 34047, 33031]
    assert tokenizer.decode(ids).tolist() == [0, 3, 1023, 7]
    assert tokenizer.encode(np.array([True, False])).tolist() == [33025, 33024]


def test_discrete_rejects_floats_and_out_of_range() -> None:
    tokenizer = DiscreteTokenizer(vocab_offset=0, num_values=4)
    with pytest.raises(TypeError, match="expected an integer array, got dtype float64"):
        tokenizer.encode(np.array([1.0]))
    with pytest.raises(ValueError, match=r"expected values in \[0, 4\), got 4 at flat index 1"):
        tokenizer.encode(np.array([3, 4]))
    with pytest.raises(ValueError, match=r"expected ids in \[0, 4\)"):
        tokenizer.decode(np.array([9]))


def test_image_patches_raster_order_and_scaling() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            image[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = 40 * (r * 3 + c)
    patches, positions = ImageTokenizer().encode(image)
    assert patches.shape == (6, 3, 16, 16) and patches.dtype == np.float32
    # patch k (raster order) holds pixel value 40k, scaled to [-1, 1] then divided by 4
    for k in range(6):
        np.testing.assert_allclose(patches[k], (40 * k / 255 * 2 - 1) / 4, atol=1e-6)
    assert positions.tolist() == [
        [0, 0, 2, 3],
        [0, 1, 2, 3],
        [0, 2, 2, 3],
        [1, 0, 2, 3],
        [1, 1, 2, 3],
        [1, 2, 2, 3],
    ]
    white = ImageTokenizer().encode(np.full((16, 16), 255, np.uint8))[0]
    assert white.shape == (1, 1, 16, 16) and np.allclose(white, 0.25)


def test_image_sides_not_multiple_of_16_are_padded() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 33, 3), dtype=np.uint8)
    tokenizer = ImageTokenizer()
    patches, positions = tokenizer.encode(image)
    assert patches.shape == (2 * 3, 3, 16, 16)  # ceil(20/16) x ceil(33/16)
    assert tokenizer.num_patches(20, 33) == 6
    assert (positions[:, 2:] == [2, 3]).all()
    # padding is 0 in normalized space, and every original pixel survives
    assert (patches[3:, :, 4:, :] == 0).all()  # rows 20..31 of the second patch row
    assert (patches[2, :, :, 1:] == 0).all()  # columns 33..47 of the third patch column
    np.testing.assert_array_equal(tokenizer.decode(patches, 20, 33), image)


def test_image_rejects_bad_input() -> None:
    tokenizer = ImageTokenizer()
    with pytest.raises(TypeError, match="expected a uint8 image, got dtype float32"):
        tokenizer.encode(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(H, W, C\)"):
        tokenizer.encode(np.zeros((2, 16, 16, 3), np.uint8))


def test_patch_position_intervals() -> None:
    positions = ImageTokenizer().positions(64, 48)  # 4 rows x 3 cols
    intervals = patch_position_intervals(positions, resolution=128)
    assert intervals.shape == (12, 2, 2)
    assert intervals[0].tolist() == [[0, 32], [0, 42]]
    assert intervals[5].tolist() == [[32, 64], [85, 128]]  # row 1, col 2
    assert intervals[11].tolist() == [[96, 128], [85, 128]]


def test_text_round_trip_and_range() -> None:
    tokenizer = TextTokenizer()
    assert tokenizer.vocab_size == 1024
    import random

    rng = random.Random(1)
    for text in [babyai_mission(rng) for _ in range(20)] + ["Unseen wörds ✓ 3.14159", ""]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int64 and ((ids >= 0) & (ids < 1024)).all()
        assert tokenizer.decode(ids) == text
    # the generated domain is compact: a mission costs about a token a word
    assert len(tokenizer.encode("pick up the red ball")) <= 10


def test_text_rejects_bad_input() -> None:
    tokenizer = TextTokenizer()
    with pytest.raises(TypeError, match="expected str, got int"):
        tokenizer.encode(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected ids in \[0, 1024\), got 5000"):
        tokenizer.decode(np.array([1, 5000]))
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        TextTokenizer("/nonexistent.model")


def test_tokenizers_pickle() -> None:
    for tokenizer in (TextTokenizer(), ImageTokenizer(), DiscreteTokenizer()):
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert repr(clone) == repr(tokenizer)
    text = pickle.loads(pickle.dumps(TextTokenizer()))
    assert text.decode(text.encode("go to the box")) == "go to the box"


def test_shipped_text_model_is_reproduced_by_its_script() -> None:
    from gato_like.tokenizers.text import DEFAULT_MODEL_FILE
    from gato_like.tokenizers.train_text import train

    assert train() == DEFAULT_MODEL_FILE.read_bytes()


def test_empty_inputs_decode_to_empty_outputs() -> None:
    from gato_like.tokenizers import ContinuousTokenizer

    assert TextTokenizer().decode([]) == ""
    assert ContinuousTokenizer().decode([]).shape == (0,)
    assert DiscreteTokenizer().decode([]).shape == (0,)
    assert DiscreteTokenizer().encode([]).shape == (0,)


def test_huge_unsigned_values_are_reported_not_wrapped() -> None:
    with pytest.raises(ValueError, match="got 18446744073709551615"):
        DiscreteTokenizer(vocab_offset=0, num_values=4).encode(np.array([2**64 - 1], dtype=np.uint64))


def test_constructor_arguments_are_checked() -> None:
    from gato_like.tokenizers import ContinuousTokenizer, VocabLayout

    with pytest.raises(ValueError, match="mu and m: expected finite numbers > 0"):
        ContinuousTokenizer(mu=float("nan"))
    with pytest.raises(TypeError):
        ContinuousTokenizer(bins=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pixel_divisor"):
        ImageTokenizer(pixel_divisor=0)
    with pytest.raises(ValueError, match="text_size: expected a positive int, got True"):
        VocabLayout(True)
    assert VocabLayout(np.int64(1024)).separator_id == 3072


def test_patch_position_intervals_reject_impossible_positions() -> None:
    with pytest.raises(ValueError, match=r"0 <= row < rows.*got \[5, 5, 2, 2\]"):
        patch_position_intervals(np.array([[5, 5, 2, 2]]))
    with pytest.raises(ValueError, match=r"got \[0, 0, 0, 0\]"):
        patch_position_intervals(np.array([[0, 0, 0, 0]]))
