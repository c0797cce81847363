"""Block hashing for prefix caching.

Every full block of a request gets a chained hash, `hash(parent_block_hash, block_token_ids,
extra_keys)`, so equal hashes mean equal whole prefixes, not just equal blocks. The request keeps
its hashes in `request.block_hashes`; the KV cache manager looks them up in the block pool.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from pagoda.engine.request import Request

SUPPORTED_HASH_ALGOS = ("sha256",)


def _make_none_hash() -> bytes:
    # The parent of a request's first block. With PYTHONHASHSEED set it is reproducible across
    # processes (and so across engine restarts); otherwise it is random per process, so hashes
    # cannot be predicted from outside to plant colliding prefixes.
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        return os.urandom(32)
    return hashlib.sha256(b"pagoda-none-hash:" + seed.encode()).digest()


NONE_HASH: bytes = _make_none_hash()

# msgpack, not pickle: a stable, explicit encoding of ints, bytes and tuples that cannot run code
# and does not change between Python versions. The encoder holds no per-call state.
_encoder = msgspec.msgpack.Encoder()


def check_hash_algo(hash_algo: str) -> None:
    """Raise ValueError naming `prefix_caching_hash_algo` unless `hash_algo` is supported."""
    if hash_algo not in SUPPORTED_HASH_ALGOS:
        raise ValueError(
            f"prefix_caching_hash_algo must be one of {SUPPORTED_HASH_ALGOS}, got {hash_algo!r}"
        )


def hash_block_tokens(
    parent_hash: bytes | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
    hash_algo: str = "sha256",
) -> bytes:
    """The 32-byte hash of one full block given its parent block's hash (None for the first).

    `extra_keys` holds anything besides tokens that changes the block's K/V (a LoRA id, image
    hashes) and must be msgpack-encodable. Raises ValueError for an unsupported `hash_algo`.
    """
    check_hash_algo(hash_algo)
    parent = NONE_HASH if parent_hash is None else parent_hash
    payload = _encoder.encode((parent, list(token_ids), extra_keys))
    return hashlib.sha256(payload).digest()


def update_block_hashes(request: Request, block_size: int, hash_algo: str = "sha256") -> None:
    """Append to `request.block_hashes` the hash of every block of the request that became full.

    Only full blocks are hashed: a partial block can still change, so it can never be shared.
    """
    num_full_blocks = request.num_tokens // block_size
    block_hashes = request.block_hashes
    parent_hash = block_hashes[-1] if block_hashes else None
    token_ids = request.all_token_ids
    for block_index in range(len(block_hashes), num_full_blocks):
        start = block_index * block_size
        parent_hash = hash_block_tokens(
            parent_hash, token_ids[start : start + block_size], None, hash_algo
        )
        block_hashes.append(parent_hash)
