"""Token embedding and LM head, sharded over the vocabulary.

The first and last layers of every model: `VocabParallelEmbedding` turns token ids into hidden
states, `ParallelLMHead` turns the sampled rows of the final hidden states into logits. With tensor
parallelism each rank holds a contiguous block of `ceil(vocab / tp)` rows; the vocabulary is padded
up to a multiple of tp_size, and the padding rows are zero and cut off the logits.

The LM head multiplies through a weight method (`pagoda.layers.quantization`) like the linear
layers. A GGUF table that arrives in its stored encoding is widened and also kept as stored
(`weight.stored_matrix`), for the C decoder and for a tied head's block GEMM. Once every layer is
processed, a table the CPU kernels read as stored (or rewrite, as a K-quant one) drops its float
copy (`drop_float_table`): lookups then widen only the rows they need, and the table costs what
the file does (Gemma 3 270M's 262k rows: 170 MiB of Q8_0 instead of 640 MiB of float32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.distributed.parallel_state import all_gather, all_reduce
from pagoda.layers.loading import copy_checked
from pagoda.layers.quantization.base import LinearMethod, create_linear_method


class VocabParallelEmbedding(nn.Module):
    """Embedding table whose rows are split over tensor-parallel ranks.

    Args:
        num_embeddings: vocabulary size of the checkpoint (before padding).
        embedding_dim: hidden size.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(
                f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)  # ceil division
        self.vocab_start = tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: str | int | None = None
    ) -> None:
        """Copy this rank's rows of the `[vocab, hidden]` checkpoint tensor; zero the padding rows.
        A table in its stored encoding (GGUF blocks) is widened and also kept as stored."""
        if not isinstance(loaded_weight, torch.Tensor):
            param.stored_matrix = loaded_weight  # type: ignore[attr-defined]
            loaded_weight = loaded_weight.dequantize()
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused, got shard_id={shard_id!r}")
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"checkpoint has {loaded_weight.shape[0]} vocabulary rows, the model "
                f"expects {self.num_embeddings} (config vocab_size)"
            )
        num_rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:num_rows], loaded_weight.narrow(0, self.vocab_start, num_rows))
        param.data[num_rows:].zero_()

    def drop_float_table(self, model: nn.Module) -> bool:
        """Free the float copy of a table kept as stored blocks that the CPU kernels read; one
        rank, and a head tied to it must multiply the blocks, not the float table. Returns
        whether it did; lookups then widen the rows they need from the blocks."""
        from pagoda.cpu.build import cpu_library
        from pagoda.cpu.matrix import gguf_format

        stored = getattr(self.weight, "stored_matrix", None)
        if stored is None or self.tp_size != 1 or cpu_library() is None or stored.in_features % 32:
            return False
        if gguf_format(stored.qtype) is None:
            return False  # other types (IQ*) widen slowly in numpy: their float copy stays
        for module in model.modules():
            if not isinstance(module, ParallelLMHead) or module.weight is not self.weight:
                continue
            if module.method.kind != "gguf-blocks":  # a tied head that multiplies the floats
                return False
        self.weight.data = torch.empty(0, self.embedding_dim)
        return True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        stored = getattr(self.weight, "stored_matrix", None)
        if stored is not None and self.weight.numel() == 0:
            # The float table was dropped: widen the looked-up rows from the stored blocks.
            ids = input_ids.reshape(-1).cpu().numpy()
            rows = type(stored)(stored.qtype, stored.rows[ids], stored.in_features)
            widened: torch.Tensor = rows.dequantize()  # [T, hidden] float32
            return widened.view(*input_ids.shape, self.embedding_dim).to(input_ids.device)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [T, hidden]
        # Ids outside this rank's block look up row 0 and are zeroed; the ranks' sum is the table.
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        embedded = F.embedding(local, self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0.0)
        return all_reduce(embedded)  # [T, hidden]

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"tp_rank={self.tp_rank}, tp_size={self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocabulary logits, sharded like the embedding.

    It is not called like a layer: the model runner asks the model for logits of only the rows it
    samples, through `compute_logits`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        # Set by tie_weights: the weight is the embedding table's, which lookups still need.
        self.tied = False
        self.method: LinearMethod = create_linear_method(self)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: str | int | None = None
    ) -> None:
        """As the embedding's, but a head that is not tied hands a weight in its stored encoding
        to its weight method, which keeps it as it is (GGUF blocks: no float copy is made)."""
        if isinstance(loaded_weight, torch.Tensor):
            super().weight_loader(param, loaded_weight, shard_id)
        elif param is self.weight:
            self.shard_index(shard_id)
            self.method.load_stored(self, param, loaded_weight, shard_id)
        else:
            raise ValueError("only the head's weight can arrive as stored blocks")

    def output_partition_sizes(self) -> list[int]:
        """The head's rows on this rank, as one shard (the linear layers' interface)."""
        return [self.num_embeddings_per_partition]

    def shard_index(self, shard_id: str | int | None) -> int:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused, got shard_id={shard_id!r}")
        return 0

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding table as the LM head weight (`tie_word_embeddings`).

        Both then hold one Parameter object, so `named_parameters()` lists it once, under the
        embedding's name, and loading the embedding loads the head.
        """
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(
                f"cannot tie LM head of shape {tuple(self.weight.shape)} to embedding of shape "
                f"{tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight
        self.tied = True

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits `[N, vocab]` for hidden states `[N, hidden]`, padding rows removed."""
        logits = self.method.apply(self, hidden_states)  # [N, vocab block]
        # Every rank's block, in rank order: the padded vocabulary on every rank.
        logits = all_gather(logits, dim=-1)  # [N, padded vocab]
        return logits[:, : self.num_embeddings]  # [N, vocab]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not called directly; use compute_logits")
