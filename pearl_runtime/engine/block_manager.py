"""Paged KV cache bookkeeping: fixed-size blocks, block tables, prefix caching, rollback.

Only full blocks of a prompt are hashed and shared. Speculative tokens are written after
the prompt, so rolling them back never touches a shared block.
"""
import hashlib
from collections import OrderedDict

from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.errors import OutOfBlocks


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Chained hash: a block's identity includes every token before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.tokens: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in LRU order; a freed block keeps its hash until it is reused
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.prefix_queries = 0   # tokens looked up in the prefix cache (every allocation's)
        self.prefix_hits = 0      # of them, tokens served from it

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free.popitem(last=False)
        else:
            del self.free[block_id]
        block = self.blocks[block_id]
        block.ref_count += 1
        return block

    def _fresh(self) -> Block:
        if not self.free:
            raise OutOfBlocks("KV cache is full")
        block = self._take()
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.tokens = None, []
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq)) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give a new sequence blocks for all its tokens, reusing cached prompt blocks.
        Sets seq.num_kv to the number of tokens whose K/V are already cached."""
        assert not seq.block_table
        # conservative: a hit on an in-use block costs no free block, a hit on a free one does
        if self.blocks_needed(len(seq)) > self.num_free:
            raise OutOfBlocks(f"sequence needs {self.blocks_needed(len(seq))} blocks, {self.num_free} free")
        parent, cached_tokens, reusing = b"", 0, self.enable_prefix_cache
        # keep at least one token to compute: its logits are the point of the forward
        full = (len(seq) - 1) // self.block_size
        for i in range(self.blocks_needed(len(seq))):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            if i < full and self.enable_prefix_cache:
                h = block_hash(parent, tokens)
                hit = self.cached.get(h) if reusing else None
                if hit is not None and self.blocks[hit].tokens == tokens:
                    block = self.blocks[hit]
                    if block.ref_count == 0:
                        self._take(hit)
                    else:
                        block.ref_count += 1
                    cached_tokens += self.block_size
                else:
                    reusing = False
                    block = self._fresh()
                    block.hash, block.tokens = h, tokens
                    self.cached[h] = block.block_id
                parent = h
            else:
                block = self._fresh()
            seq.block_table.append(block.block_id)
        seq.num_kv = cached_tokens
        self.prefix_queries += len(seq)
        self.prefix_hits += cached_tokens

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens. False if the cache is full
        (nothing is allocated then)."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._fresh().block_id)
        return True

    def truncate(self, seq: Sequence, num_kv: int) -> None:
        """Roll the KV back to its first `num_kv` tokens; frees blocks no longer needed."""
        assert num_kv <= seq.num_kv
        seq.num_kv = num_kv
        keep = self.blocks_needed(max(num_kv, len(seq)))
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free_seq(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_kv = 0

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            self.free[block_id] = None
