"""Low-rank adaptation (LoRA, Hu et al., 2021) of the transformer blocks, for fine-tuning.

Each adapted ``nn.Linear`` keeps its pretrained weight ``W`` (out, in) frozen and learns
``B`` (out, r) and ``A`` (r, in)::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        # B starts at 0: the model starts unchanged

:func:`merge_lora` folds ``(alpha / r) B A`` into ``W`` and puts plain ``nn.Linear`` layers back,
so a fine-tuned checkpoint has exactly the state-dict keys of the base model and loads with
``Policy.from_checkpoint`` and ``gato-like serve`` unchanged.

Written here rather than taken from peft: peft would add transformers and accelerate to the
install for four layer types, and its adapter checkpoints are not our checkpoint format.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: The linear layers of a :class:`gato_like.model.Block` that get adapters: attention and MLP.
LORA_TARGETS = ("qkv", "proj", "fc", "fc_out")


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank: expected >= 1, got {rank}")
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., in) -> (..., out)."""
        update = (self.dropout(x) @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        linear = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            linear.weight.copy_((self.base.weight.float() + delta).to(linear.weight.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> list[str]:
    """Replace every ``nn.Linear`` named in ``targets`` inside ``model.blocks`` by a :class:`LoRALinear`.

    Returns the qualified names of the adapted layers.
    """
    adapted = []
    blocks = getattr(model, "blocks", None)
    layers: list[nn.Module] = list(blocks) if isinstance(blocks, nn.ModuleList) else []
    for index, layer in enumerate(layers):
        for name in targets:
            linear = getattr(layer, name, None)
            if isinstance(linear, nn.Linear):
                setattr(layer, name, LoRALinear(linear, rank, alpha, dropout))
                adapted.append(f"blocks.{index}.{name}")
    if not adapted:
        raise ValueError(f"apply_lora: no nn.Linear named {targets} under model.blocks")
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into a plain ``nn.Linear``, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                count += 1
    return count
