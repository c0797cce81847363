"""Rotary position embeddings (RoPE) with the Hugging Face scaling variants.

Attention blocks rotate q and k by angles `position * inv_freq` right after the qkv projection, so
the keys written to the paged KV cache are already rotated. Since a request's tokens arrive at any
position (chunked prefill, decode), cos/sin are precomputed for every position up to the model's
maximum and gathered by the `positions` tensor of the step.

`inv_freq` and the cos/sin tables are computed in float32 with the same operations, in the same
order, as `transformers.modeling_rope_utils`, so float32 results match it bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagoda.cpu import elementwise

SUPPORTED_ROPE_TYPES = (
    "default",
    "linear",
    "dynamic",
    "llama3",
    "yarn",
    "longrope",
    "freq_factors",
)


def _base_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base**exponents)  # [R/2]


def _llama3_inv_freq(base: float, rotary_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between."""
    inv_freq = _base_inv_freq(base, rotary_dim)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(
    base: float, rotary_dim: int, factor: float, original: int, scaling: dict[str, Any]
) -> torch.Tensor:
    """YaRN: interpolate (divide by `factor`) the low frequencies, keep the high ones, and blend
    linearly over the dims whose wavelength falls between `beta_fast` and `beta_slow` rotations
    of the original context."""

    def correction_dim(rotations: float) -> float:
        # The dim whose frequency makes `rotations` turns over the original context.
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero below
    ramp = (torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)
    extrapolated_share = 1 - ramp.clamp(0, 1)  # 1 for high frequencies, 0 for low ones
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).to(torch.float32) / rotary_dim)
    interpolated = 1.0 / (factor * pos_freqs)
    extrapolated = 1.0 / pos_freqs
    return interpolated * (1 - extrapolated_share) + extrapolated * extrapolated_share  # [R/2]


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _longrope_inv_freq(base: float, rotary_dim: int, factors: list[float]) -> torch.Tensor:
    """LongRoPE (Phi-3): plain RoPE frequencies, each divided by its own rescale factor."""
    if len(factors) != rotary_dim // 2:
        raise ValueError(
            f"longrope short_factor/long_factor must have rotary_dim / 2 = {rotary_dim // 2} "
            f"entries, got {len(factors)}"
        )
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)  # [R/2]


def _dynamic_ntk_base(
    base: float, rotary_dim: int, factor: float, seq_len: int, original: int
) -> float:
    # NTK-aware scaling: stretch the base so the lowest frequency covers `seq_len` positions.
    return base * ((factor * seq_len / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def _cos_sin(inv_freq: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(start, end, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
    return freqs.cos(), freqs.sin()


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened q `[T, H*D]` and k `[T, Hkv*D]` by position.

    Only the first `rotary_dim` dims of each head rotate (partial rotary); the rest pass through.
    Neox style rotates the two halves of those dims against each other (Llama, Qwen, Mistral);
    GPT-J style rotates interleaved pairs.

    Build it with `get_rope`; one instance is shared by all layers of a model.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        is_neox_style: bool,
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
    ) -> None:
        super().__init__()
        if rotary_dim > head_dim or rotary_dim % 2 != 0:
            raise ValueError(
                f"rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        # float32 tables [max_position, R/2]; cast to the activation dtype per step, as HF does.
        self.cos_cache: torch.Tensor
        self.sin_cache: torch.Tensor
        self.register_buffer("cos_cache", cos_cache, persistent=False)
        self.register_buffer("sin_cache", sin_cache, persistent=False)
        self._step_cache: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None
        self._checked_positions: torch.Tensor | None = None

    @property
    def max_position(self) -> int:
        return self.cos_cache.shape[0]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rotate_in_place(positions, q, k):
            return q, k
        cos, sin = self._cos_sin(positions, q.dtype)
        if q.dim() == 2 and q.shape[0] == k.shape[0]:
            # q and k rotated in one pass: [T, (H + Hkv) * D] -> split back.
            rotated = self._rotate(torch.cat((q, k), dim=-1), cos, sin)
            q, k = rotated.split((q.shape[-1], k.shape[-1]), dim=-1)
            return q, k
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate_in_place(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Rotate q and k in place with the compiled kernel (the same arithmetic as `_rotate`,
        bit for bit), when it can take them: float32 rows on CPU, neox style. False otherwise."""
        if not (
            self.is_neox_style
            # The same tensor as q and k (a caller's shortcut) would be rotated twice in place.
            and q.data_ptr() != k.data_ptr()
            and q.dim() == 2
            and k.dim() == 2
            and positions.dtype == torch.int64
            and positions.is_contiguous()
            and elementwise.applies(q, k, self.cos_cache, self.sin_cache)
            and self.cos_cache.is_contiguous()
            and self.sin_cache.is_contiguous()
        ):
            return False
        library = elementwise.elementwise_library()
        if library is None:
            return False
        checked = self._checked_positions
        if checked is None or checked is not positions:
            # The kernel reads the tables unchecked: refuse positions past them, as indexing would.
            if positions.numel() and int(positions.max()) >= self.max_position:
                raise IndexError(
                    f"position {int(positions.max())} is out of range for the rotary tables "
                    f"({self.max_position} positions)"
                )
            self._checked_positions = positions  # every layer of a step passes the same tensor
        for x in (q, k):
            elementwise.rotary_neox_(
                library,
                x,
                self.head_dim,
                self.rotary_dim,
                self.cos_cache,
                self.sin_cache,
                positions,
            )
        return True

    def _cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, R/2] at `positions`; every layer of a step passes the same positions
        tensor, so the gather runs once per step, not once per layer."""
        cached = self._step_cache
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        cos = self.cos_cache[positions].to(dtype)[:, None, :]  # [T, 1, R/2]
        sin = self.sin_cache[positions].to(dtype)[:, None, :]  # [T, 1, R/2]
        # Holding `positions` keeps the identity check sound (its id cannot be reused meanwhile).
        self._step_cache = (positions, dtype, cos, sin)
        return cos, sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_dim)  # [T, H, D]
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)  # [T, H, R/2] each
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, H, R]
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]  # [T, H, R/2] each
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            rotated = rotated.flatten(-2)  # [T, H, R]
        if passthrough.shape[-1]:
            rotated = torch.cat((rotated, passthrough), dim=-1)  # [T, H, D]
        return rotated.reshape(num_tokens, -1)  # [T, H*D]

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"max_position={self.max_position}, is_neox_style={self.is_neox_style}"
        )


def get_rope(
    head_dim: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    is_neox_style: bool = True,
) -> RotaryEmbedding:
    """Build the rotary embedding for a model.

    Args:
        max_position: the config's `max_position_embeddings`. For `linear` and `dynamic` scaling
            the tables extend to `max_position * factor`, the context those variants stretch to;
            for `yarn` to `original_max_position_embeddings * factor` if that is longer.
        base: `rope_theta`.
        rope_scaling: None (or `rope_type` "default") for plain RoPE, else a dict with `rope_type`
            (or the older `type`) and that type's keys, as `pagoda.models.utils.rope_settings`
            returns it. `yarn` and `longrope` scale cos/sin by their attention factor, as HF does.

    Raises:
        ValueError: for a rope type other than those in `SUPPORTED_ROPE_TYPES`, or longrope
            factor lists of the wrong length.
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        inv_freq = _base_inv_freq(base, rotary_dim)
        cos, sin = _cos_sin(inv_freq, 0, max_position)
    elif rope_type == "linear":
        # Position interpolation: position p is treated as p / factor.
        factor = scaling["factor"]
        inv_freq = _base_inv_freq(base, rotary_dim)
        inv_freq /= factor
        cos, sin = _cos_sin(inv_freq, 0, int(max_position * factor))
    elif rope_type == "dynamic":
        # NOTE: HF recomputes the base for every forward from that sequence's length (plain RoPE up
        # to max_position_embeddings, a base stretched for seq_len beyond). A paged KV cache holds
        # keys rotated when they were written and serves many sequences at once, so we cannot
        # re-rotate per sequence. We keep plain RoPE for positions within the original context
        # (identical to HF there) and, beyond it, one fixed base stretched for the longest
        # supported context, `max_position * factor`. Past the original context the result is
        # close to, not equal to, HF's.
        factor = scaling["factor"]
        original = max_position
        extended = int(max_position * factor)
        cos, sin = _cos_sin(_base_inv_freq(base, rotary_dim), 0, original)
        long_base = _dynamic_ntk_base(base, rotary_dim, factor, extended, original)
        long_cos, long_sin = _cos_sin(_base_inv_freq(long_base, rotary_dim), original, extended)
        cos = torch.cat((cos, long_cos))  # [max_position * factor, R/2]
        sin = torch.cat((sin, long_sin))  # [max_position * factor, R/2]
    elif rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_position)
        inv_freq = _llama3_inv_freq(base, rotary_dim, scaling)
        cos, sin = _cos_sin(inv_freq, 0, max_position)
    elif rope_type == "yarn":
        original = scaling.get("original_max_position_embeddings") or max_position
        factor = scaling.get("factor") or max_position / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:  # DeepSeek: a ratio of two magnitude scales
                attention_factor = _yarn_mscale(factor, mscale)
                attention_factor /= _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        inv_freq = _yarn_inv_freq(base, rotary_dim, factor, original, scaling)
        cos, sin = _cos_sin(inv_freq, 0, max(max_position, int(original * factor)))
        cos, sin = cos * attention_factor, sin * attention_factor
    elif rope_type == "longrope":
        # NOTE: HF picks the factors per forward pass: `short_factor` while the sequence is at
        # most `original_max_position_embeddings` long, `long_factor` for every position once it
        # is longer (it then drops and recomputes its KV cache). A paged cache keeps keys rotated
        # when they were written, and one sequence's keys must share one rotation, so we pick
        # once per model: short factors when the model's whole context (`max_position`) fits the
        # original one, long factors otherwise (as vLLM does for a max_model_len beyond it). That
        # equals HF for every sequence of a short-context model, and for every sequence longer
        # than the original context of a long-context model.
        original = scaling.get("original_max_position_embeddings") or max_position
        factor = scaling.get("factor") or max_position / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0
            if factor > 1:
                attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
        factors = scaling["long_factor"] if max_position > original else scaling["short_factor"]
        inv_freq = _longrope_inv_freq(base, rotary_dim, list(factors))
        cos, sin = _cos_sin(inv_freq, 0, max_position)
        cos, sin = cos * attention_factor, sin * attention_factor
    elif rope_type == "freq_factors":
        # Pagoda's name for a GGUF file's `rope_freqs` tensor (Llama 3.1+): llama.cpp divides
        # each frequency by its factor; the llama3 settings that produced them are not recorded.
        inv_freq = _longrope_inv_freq(base, rotary_dim, list(scaling["factors"]))
        cos, sin = _cos_sin(inv_freq, 0, max_position)
    else:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RotaryEmbedding(head_dim, rotary_dim, is_neox_style, cos, sin)
