"""Text to ids with SentencePiece (Gato section 2.1: ids in ``[0, V)``).

The project ships a small unigram model (``assets/text.model``, V = 1024, byte fallback) trained
on generated text by :mod:`gato_like.tokenizers.train_text`. Any SentencePiece ``.model`` works;
its vocabulary size becomes V, the offset of every other id range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm

from gato_like.tokenizers._checks import as_ids

DEFAULT_MODEL_FILE = Path(__file__).with_name("assets") / "text.model"
DEFAULT_VOCAB_SIZE = 1024


class TextTokenizer:
    """A SentencePiece model; picklable (the model travels as bytes), so usable in data-loader workers."""

    def __init__(self, model_file: str | Path | None = None, *, model_proto: bytes | None = None) -> None:
        if model_proto is None:
            path = Path(model_file) if model_file is not None else DEFAULT_MODEL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"TextTokenizer: no SentencePiece model at {path}")
            model_proto = path.read_bytes()
        self._load(model_proto)

    def _load(self, model_proto: bytes) -> None:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as error:
            raise ValueError(f"TextTokenizer: not a SentencePiece model ({error})") from error
        self._proto = bytes(model_proto)
        self._sp = processor

    def __getstate__(self) -> dict[str, bytes]:
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self._load(state["model_proto"])

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"

    @property
    def model_proto(self) -> bytes:
        """The serialized model, as written into checkpoints."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """V: text ids lie in ``[0, V)``."""
        return int(self._sp.GetPieceSize())

    def encode(self, text: str) -> np.ndarray:
        """A string to ids ``(n,)`` int64 in ``[0, V)`` (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode: expected str, got {type(text).__name__}")
        return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int64)

    def decode(self, ids: np.ndarray) -> str:
        """Ids ``(n,)`` in ``[0, V)`` back to the string."""
        ids = as_ids(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError(f"TextTokenizer.decode: expected 1-d integer ids, got {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"TextTokenizer.decode: expected ids in [0, {self.vocab_size}), got {int(ids[bad][0])}"
            )
        return str(self._sp.DecodeIds(ids.tolist()))
