"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass

import numpy as np

from engine.sequence import Sequence

NULL_BLOCK = 0
"""Block 0 is never handed out: padded slots and padded block-table entries point at it."""


def block_hash(parent: bytes | None, tokens: Tokens[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of the parent block's key and the block's tokens as int64.

    It covers the whole chain (everything before the block), and unlike Python's ``hash`` it cannot be
    steered into a collision by crafted token ids (vLLM's CVE-2025-25183). A few microseconds per
    block of 16 tokens, about 0.1 ms per step of 256 sequences (docs/benchmarks.md).
    """
    return hashlib.sha256((parent or b"") + _int64_packer(len(tokens))(*tokens)).digest()


@functools.cache
def _int64_packer(n: int) -> Callable[..., bytes]:
    """Packs ``n`` ints as little-endian int64 (the same bytes on every platform)."""
    return struct.Struct(f"<{n}q").pack


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    parent: bytes | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    """Hands out cache blocks and shares full blocks between sequences with the same prefix.

    A full block's key (``block_hash``) chains the key of the block before it with its own tokens,
    so two sequences share a block only when everything before it matches too; a cached block is
    reused only when its recorded parent key and tokens are equal as well, so even a hash collision
    cannot share KV computed after another prefix. Free blocks keep
    their hash until they are handed out again, so a prefix outlives the requests that wrote it;
    the least recently freed block is reused first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}
        self.prefix_hit_blocks = 0
        # The block tables again, as rows of one array (a row per sequence holding blocks, zeros past its
        # table's end), so that a step's tables are one gather (``tables``) instead of a copy per sequence.
        self._tables = np.zeros((64, 64), dtype=np.int64)
        self._table_lens = np.zeros(64, dtype=np.int64)
        self._free_rows: list[int] = list(range(63, -1, -1))

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that ``seq`` can hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks to ``seq`` until it can hold ``num_tokens`` tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            self._append(seq, self._take_free())

    def tables(self, seqs: list[Sequence]) -> np.ndarray:
        """The block tables of ``seqs`` (each holding at least one block), one row each, as wide as the
        longest and padded with ``NULL_BLOCK``."""
        rows = np.fromiter([s.table_row for s in seqs], dtype=np.int64, count=len(seqs))
        width = int(self._table_lens[rows].max()) if len(seqs) else 0
        return self._tables[rows, :width]

    def _append(self, seq: Sequence, block_id: int) -> None:
        table, row = seq.block_table, seq.table_row
        if row < 0:
            if not self._free_rows:
                old = len(self._table_lens)
                self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)])
                self._table_lens = np.concatenate([self._table_lens, np.zeros_like(self._table_lens)])
                self._free_rows = list(range(2 * old - 1, old - 1, -1))
            row = seq.table_row = self._free_rows.pop()
        n = len(table)
        if n == self._tables.shape[1]:
            self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)], axis=1)
        self._tables[row, n] = block_id
        self._table_lens[row] = n + 1
        table.append(block_id)

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prefix of full blocks.

        The last prompt token is always recomputed (its logits are needed), so a prompt that
        is entirely cached keeps its last block out of the match. A sequence that scores its prompt
        (``prompt_logprobs``) takes no cached block: it needs the logits of every prompt position,
        so its whole prompt is computed (its blocks are still published for others).
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return
        bs = self.block_size
        max_blocks = (seq.num_known_tokens - 1) // bs
        prev: bytes | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.known_tokens(i * bs, (i + 1) * bs))
            h = block_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent != prev or block.tokens != tokens:
                break
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            self._append(seq, block_id)
            prev = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.last_block_hash = prev
        self.prefix_hit_blocks += len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks of ``seq`` that are full of known tokens whose KV is (being) computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        limit = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
        while seq.num_hashed_blocks < limit:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.known_tokens(i * bs, (i + 1) * bs))
            h = block_hash(seq.last_block_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash is None:
                block.hash, block.parent, block.tokens = h, seq.last_block_hash, tokens
                self.cached[h] = block.block_id
            seq.last_block_hash = h
            seq.num_hashed_blocks += 1

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of ``seq``; shared blocks stay with their other users."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        row = seq.table_row
        if row >= 0:
            self._tables[row, : len(seq.block_table)] = NULL_BLOCK
            self._table_lens[row] = 0
            self._free_rows.append(row)
            seq.table_row = -1
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.parent, block.tokens = None, None, ()
        block.ref_count = 1
        return block_id
