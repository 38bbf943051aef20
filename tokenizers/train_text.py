"""Reproduce the shipped SentencePiece model: ``python -m gato_like.tokenizers.train_text``.

Trains a unigram model with byte fallback (any UTF-8 text encodes, nothing maps to <unk>) on
:func:`gato_like.tokenizers.text_corpus.corpus`, single-threaded so the output is deterministic.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import sentencepiece as spm

from gato_like.tokenizers.text import DEFAULT_MODEL_FILE, DEFAULT_VOCAB_SIZE
from gato_like.tokenizers.text_corpus import corpus


def train(vocab_size: int = DEFAULT_VOCAB_SIZE, num_lines: int = 20000, seed: int = 0) -> bytes:
    """Train on the generated corpus and return the serialized model (bytes of a ``.model`` file)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(num_lines=num_lines, seed=seed),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_FILE, help="where to write the .model file")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--lines", type=int, default=20000, help="lines of generated corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    proto = train(args.vocab_size, args.lines, args.seed)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(proto)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(proto)} bytes, vocab {args.vocab_size})")


if __name__ == "__main__":
    main()
