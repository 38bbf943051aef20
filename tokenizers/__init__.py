"""The Gato token scheme: text, continuous, discrete and image tokenizers, embodiment specs and the
sequence builder that turns an episode into one flat token sequence. Imported as
``gato_like.tokenizers``; every number of the scheme is in :mod:`gato_like.tokenizers.vocab`.
"""

from gato_like.tokenizers.continuous import ContinuousTokenizer
from gato_like.tokenizers.discrete import DiscreteTokenizer
from gato_like.tokenizers.image import ImageTokenizer, patch_position_intervals
from gato_like.tokenizers.sequence import SequenceBuilder, TokenSequence
from gato_like.tokenizers.spec import (
    ActionSpec,
    EmbodimentSpec,
    ObservationSpec,
    SpecError,
    SpecMismatchError,
    Violation,
)
from gato_like.tokenizers.text import TextTokenizer
from gato_like.tokenizers.vocab import TokenType, VocabLayout

__all__ = [
    "ActionSpec",
    "ContinuousTokenizer",
    "DiscreteTokenizer",
    "EmbodimentSpec",
    "ImageTokenizer",
    "ObservationSpec",
    "SequenceBuilder",
    "SpecError",
    "SpecMismatchError",
    "TextTokenizer",
    "TokenSequence",
    "TokenType",
    "Violation",
    "VocabLayout",
    "patch_position_intervals",
]
