"""Normalization layers, with the residual add fused in.

Decoder layers keep the residual stream apart from the normalized activations: each norm call
`norm(x, residual)` first adds the sublayer output to the residual, then normalizes the sum, and
returns both. This saves one pass over the activations per sublayer on backends that fuse it, and
reads the same as the Hugging Face `hidden = residual + hidden; residual = hidden; norm(hidden)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.cpu import elementwise


class RMSNorm(nn.Module):
    """Root-mean-square norm: `weight * x / sqrt(mean(x^2) + eps)`.

    The statistics are computed in float32 and the result is cast back to the input dtype before
    the weight multiply, exactly as Hugging Face's `LlamaRMSNorm`, so half-precision runs match it.

    `forward(x)` returns the normalized x; `forward(x, residual)` returns `(norm(x + residual),
    x + residual)`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        # The one-pass kernel (add and norm together), in models built for the approximate paths;
        # not for subclasses with arithmetic of their own (Gemma's).
        own_norm = type(self)._norm is RMSNorm._norm
        self._fused = (
            elementwise.elementwise_library()
            if own_norm and elementwise.fused_elementwise_enabled()
            else None
        )

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        if input_dtype == torch.float32:
            # One fused call instead of six: the same math when there is nothing to cast.
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.variance_epsilon)
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        library = self._fused
        if (
            library is not None
            and x.dim() == 2
            and x.is_contiguous()
            and elementwise.applies(x, self.weight)
            and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype))
        ):
            normed, total = elementwise.add_rms_norm(
                library, x, residual, self.weight, self.variance_epsilon
            )
            return normed if residual is None else (normed, total)
        if residual is None:
            return self._norm(x)
        # The add happens in the model dtype, like HF's `residual + hidden_states`.
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: `(1 + weight) * x / sqrt(mean(x^2) + eps)`, weights stored around zero.

    Unlike `RMSNorm`, the weight multiply happens in float32 before the cast back to the input
    dtype, exactly as Hugging Face's `GemmaRMSNorm` (Gemma 1, 2 and 3).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.to(torch.float32))).to(input_dtype)


class WeightlessRMSNorm(nn.Module):
    """RMS normalisation with no weight, in float32 and cast back: Llama 4's q/k norm
    (`x / sqrt(mean(x^2) + eps)` over the last dim)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` with the same fused-residual calling convention as `RMSNorm`.

    It normalizes in the input dtype, as `nn.LayerNorm` does in Hugging Face models that use it.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(hidden_size, eps=eps, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        residual = x + residual
        normed = F.layer_norm(residual, self.normalized_shape, self.weight, self.bias, self.eps)
        return normed, residual
