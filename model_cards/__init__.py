"""Model-card templates (Jinja), shipped inside the package as ``gato_like.model_cards``.

``gato-like eval`` renders ``card.md.j2`` with the checkpoint's ``meta.json`` (data, preset,
compute, training time) and the evaluation's results; see :func:`gato_like.training.evaluate.write_card`.
"""

from importlib.resources import files

CARD_TEMPLATE = "card.md.j2"


def template_text(name: str = CARD_TEMPLATE) -> str:
    """The text of a template in this folder."""
    return (files(__name__) / name).read_text()
