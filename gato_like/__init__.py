"""gato-like: a Gato-style generalist agent.

One transformer, one token sequence, many embodiments. The token scheme lives in
:mod:`gato_like.tokenizers`, episodes in :mod:`gato_like.data_pipelines`, the training loop in
:mod:`gato_like.training`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
