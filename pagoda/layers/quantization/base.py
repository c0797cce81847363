"""The weight-method interface, and the construction scope that picks a method for each layer.

A model is built inside `linear_methods(plan.create_method)`; every `LinearBase` and
`ParallelLMHead` constructed in that scope asks `create_linear_method(self)` for its method, so
model files never thread a method through their constructors. Outside any scope a layer gets the
unquantized method (float weights, `F.linear`), which is what layer unit tests use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from pagoda.cpu.matrix import Matrix


class WeightedLayer(Protocol):
    """What a weight method reads of its layer (a `LinearBase` or a `ParallelLMHead`)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def output_partition_sizes(self) -> list[int]: ...

    def shard_index(self, shard_id: str | int | None) -> int: ...


class LinearMethod(ABC):
    """How one linear layer stores its weight and computes `x @ W.T + b`.

    The layer calls `create_weights` once from its constructor, routes stored (non-tensor)
    checkpoint data to `load_stored`, and calls `apply` in its forward; the model loader calls
    `process_weights_after_loading` once every parameter is loaded.
    """

    # What the layer multiplies by once processed ("float", "float16", "gguf-blocks").
    kind: str = "float"

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias_size: int | None
    ) -> None:
        """Register `layer.weight` [output_size, input_size] and `layer.bias` (None: no bias)."""
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        if bias_size is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(torch.empty(bias_size), requires_grad=False)

    def load_stored(
        self, layer: WeightedLayer, param: nn.Parameter, stored: Any, shard_id: str | int | None
    ) -> None:
        """Take a weight in its stored encoding (a GGUF block matrix) for shard `shard_id`.

        Raises:
            ValueError: this method only takes tensors.
        """
        raise ValueError(f"{type(self).__name__} takes checkpoint tensors, not stored blocks")

    def accepts(self, layer: WeightedLayer, param: nn.Parameter, loaded: torch.Tensor) -> bool:
        """Whether a checkpoint tensor for `param` goes to `load_stored` as it is (a quantized
        tensor) rather than being copied into the parameter."""
        return False

    def optional_parameters(self, layer: WeightedLayer) -> set[str]:
        """The layer's parameters (local names) that may stay unloaded, given what has loaded:
        a quantized checkpoint's layer needs either its float weight or its quantized tensors."""
        return set()

    def process_weights_after_loading(self, layer: WeightedLayer) -> None:  # noqa: B027 - optional
        """Turn the loaded parameters into the form `apply` multiplies by (once)."""

    def held_bytes(self, layer: WeightedLayer) -> int:
        """Bytes of the weight this layer multiplies by, every copy counted (biases and a tied
        head's table, which the embedding holds, aside)."""
        if getattr(layer, "tied", False):
            return 0
        return layer.weight.numel() * layer.weight.element_size()

    @abstractmethod
    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in] @ W.T + b` -> [..., out]."""

    def decoder_matrices(self, layer: WeightedLayer, keep: list[Any]) -> list[Matrix]:
        """The weight as the C decoder's matrices, one per output shard (q/k/v, gate/up), each
        with its bias; the arrays they point into are appended to `keep`.

        Raises:
            ValueError: this method keeps nothing the decoder can read.
        """
        raise ValueError(f"{type(self).__name__} keeps no weights for the C decoder")


class UnquantizedLinearMethod(LinearMethod):
    """Float weights in the model's dtype, multiplied by `F.linear`: GPUs, `--dtype float32`,
    float32 checkpoints, layer unit tests. Nothing to process after loading."""

    kind = "float"

    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class BatchedCopy:
    """A layer's weight in a second dtype (bfloat16) for products of many tokens at once.

    On CPUs with bfloat16 units (AVX512-BF16, AMX) oneDNN multiplies bfloat16 at about twice the
    float32 rate; the activations are rounded to bfloat16, the sums kept in float32. Below
    `MIN_TOKENS` tokens a step is bound by reading the weights, not by arithmetic: a bfloat16 copy
    is three times the bytes of Q4_1 blocks, so the layer's own product runs instead (the
    crossover, measured over a whole model's layers, is in docs/performance.md item 14).
    """

    MIN_TOKENS = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None or bias.numel() == 0 else bias.detach().float().clone()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def applies(self, x: torch.Tensor) -> bool:
        return x.numel() >= self.MIN_TOKENS * x.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.weight.dtype), self.weight).float()  # [..., out]
        if self.bias is not None:
            out += self.bias
        return out


def array_bytes(value: Any) -> int:
    """Bytes of the numpy arrays and tensors in `value` (nested lists of them, as `keep` lists)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list):
        return sum(array_bytes(item) for item in value)
    return 0


def release_float_weights(layer: WeightedLayer) -> None:
    """Free the float weight (and bias) a method no longer multiplies by; a weight tied to the
    embedding table stays, since lookups still need it."""
    if getattr(layer, "tied", False):
        return
    layer.weight.data = torch.empty(0)
    if layer.bias is not None:
        layer.bias.data = torch.empty(0)


def split_bias(layer: WeightedLayer, sizes: list[int]) -> list[torch.Tensor | None]:
    """The layer's bias cut like its output shards (None for each when it has no bias)."""
    bias = layer.bias
    if bias is None or bias.numel() == 0:
        return [None] * len(sizes)
    return list(bias.detach().split(sizes))


_MethodFactory = Callable[[nn.Module], LinearMethod]
# NOTE: construction-scoped, like torch's default dtype and device: set only by `linear_methods`
# around building a model, and read only by layer constructors.
_factory: _MethodFactory | None = None
_experts_as_layers = False


@contextmanager
def linear_methods(factory: _MethodFactory, experts_as_layers: bool = False) -> Iterator[None]:
    """Layers constructed inside the block get their method from `factory(layer)`; with
    `experts_as_layers`, mixture-of-experts banks build each expert from linear layers (so that
    a quantized checkpoint's experts get the same weight method as every other projection)."""
    global _factory, _experts_as_layers
    previous = _factory, _experts_as_layers
    _factory, _experts_as_layers = factory, experts_as_layers
    try:
        yield
    finally:
        _factory, _experts_as_layers = previous


def experts_as_layers() -> bool:
    """Whether an MoE bank under construction should build its experts as linear layers."""
    return _experts_as_layers


def create_linear_method(layer: nn.Module) -> LinearMethod:
    """The method for a layer under construction: the scope's choice, else unquantized."""
    if _factory is not None:
        return _factory(layer)
    return UnquantizedLinearMethod()
