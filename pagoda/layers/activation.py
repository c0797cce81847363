"""Gated activations over a fused gate/up projection.

A gated MLP computes `act(gate(x)) * up(x)`; Pagoda fuses gate and up into one matmul
(`MergedColumnParallelLinear`), whose output is `[gate | up]` along the last dim. These modules
split it and apply the gate. `get_activation` gives the plain activation of a two-layer MLP
(GPT-2, OPT).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.cpu import elementwise


class SiluAndMul(nn.Module):
    """`silu(gate) * up` for `x = [gate | up]` of shape [T, 2I]; returns [T, I] (Llama, Qwen, Mistral)."""

    def __init__(self) -> None:
        super().__init__()
        # The one-pass kernel, in models built for the approximate paths.
        self._fused = (
            elementwise.elementwise_library() if elementwise.fused_elementwise_enabled() else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.dim() == 2 and elementwise.applies(x):
            return elementwise.silu_and_mul(self._fused, x)
        half = x.shape[-1] // 2
        gated = F.silu(x[..., :half])  # [T, I], a new tensor: multiplied in place
        return gated.mul_(x[..., half:])


class GeluAndMul(nn.Module):
    """`gelu(gate) * up` for `x = [gate | up]` of shape [T, 2I]; returns [T, I] (Gemma).

    Args:
        approximate: "none" for the exact erf GELU, "tanh" for the tanh approximation
            (`gelu_pytorch_tanh` in Hugging Face configs).
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return F.gelu(x[..., :half], approximate=self.approximate) * x[..., half:]  # [T, I]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def get_gated_activation(hidden_act: str) -> nn.Module:
    """The gated activation for a Hugging Face `hidden_act` name; ValueError for unknown names."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    if hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        # NOTE: HF's "gelu_new" is the tanh approximation too, despite its name.
        return GeluAndMul("none" if hidden_act == "gelu" else "tanh")
    raise ValueError(
        f"unsupported hidden_act {hidden_act!r}; supported: silu, swish, gelu, gelu_new, "
        "gelu_pytorch_tanh"
    )


def get_activation(hidden_act: str) -> nn.Module:
    """The plain (non-gated) activation for a Hugging Face `hidden_act` name, as in GPT-2's and
    OPT's two-layer MLPs; ValueError for unknown names."""
    if hidden_act == "relu":
        return nn.ReLU()
    if hidden_act in ("silu", "swish"):
        return nn.SiLU()
    if hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU("none" if hidden_act == "gelu" else "tanh")
    raise ValueError(
        f"unsupported hidden_act {hidden_act!r}; supported: relu, silu, swish, gelu, gelu_new, "
        "gelu_pytorch_tanh"
    )
