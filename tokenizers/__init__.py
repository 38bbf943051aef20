"""The Gato token scheme: text, continuous, discrete and image tokenizers, embodiment specs and the
sequence builder that turns an episode into one flat token sequence. Imported as
``gato_like.tokenizers``; every number of the scheme is in :mod:`gato_like.tokenizers.vocab`.
"""

if __name__ == "tokenizers":  # a source checkout's root on sys.path: not us, see gato_like._shadow
    from gato_like._shadow import hand_over

    hand_over(__file__)
else:
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
