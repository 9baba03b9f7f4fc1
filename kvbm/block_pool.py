"""A paged KV block pool: fixed blocks with reference counts, an LRU free queue and a prefix
cache keyed by the chained block hash (dynamo.kv_hash). KV events are emitted at the exact place
a block changes state, so a consumer replaying them holds the pool's set of cached hashes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvEventData

# Engines and the pool report KV cache changes synchronously; workers/engine.py re-exports this.
KvEventSink = Callable[[KvEventData], None]


class EvictedBlock(NamedTuple):
    """A cached block allocate() is about to reuse: its KV is still intact while the hook runs.
    A named tuple: allocate() builds one per evicted block on the scheduler's hot path, at half
    a frozen dataclass's cost."""

    block_id: int
    block_hash: int
    parent_hash: int | None


# Called by allocate() with the cached blocks it evicts, before handing them out (KVBM offload).
EvictionHook = Callable[[list[EvictedBlock]], None]


@dataclass(slots=True, eq=False)
class Block:
    """One fixed-size page of KV cache. Identity matters (eq=False): blocks are hashed by id()."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and committed, else None
    parent_hash: int | None = None  # the hash it was committed under; orders snapshot()


class FreeBlockQueue:
    """Blocks with ref_count 0, least recently freed at the head.

    An OrderedDict keyed by block id gives O(1) push at either end, pop at the head and removal
    from the middle (a cached free block taken back by a prefix hit) without hand-written links.
    """

    __slots__ = ("_blocks",)

    def __init__(self, blocks: Sequence[Block] = ()) -> None:
        self._blocks: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._blocks.values())

    def push_tail(self, block: Block) -> None:
        self._blocks[block.block_id] = block

    def push_head(self, block: Block) -> None:
        self._blocks[block.block_id] = block
        self._blocks.move_to_end(block.block_id, last=False)

    def pop_head(self) -> Block:
        return self._blocks.popitem(last=False)[1]

    def remove(self, block: Block) -> None:
        del self._blocks[block.block_id]


class BlockPool:
    """`num_blocks` blocks of `block_size_tokens` tokens each.

    A block is *active* while ref_count > 0 and *free* otherwise. A free block that still has a
    hash is *cached*: a later prefix match can take it back (acquire) until allocate() evicts it,
    least recently freed first. Invariant: `_cached[h].block_hash == h` for every cached hash,
    and every block with a hash is in `_cached` (exactly one block per hash).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size_tokens: int,
        on_event: KvEventSink | None = None,
        on_evict: EvictionHook | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size_tokens <= 0:
            raise ValueError(f"block_size_tokens must be positive, got {block_size_tokens}")
        self.num_blocks = num_blocks
        self.block_size_tokens = block_size_tokens
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[int, Block] = {}
        self._on_event = on_event
        self.on_evict = on_evict

    # ------------------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now, cached-but-evictable ones included."""
        return len(self._free)

    @property
    def num_active_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_active_blocks / self.num_blocks

    def get_cached(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> set[int]:
        return set(self._cached)

    def free_block_ids(self) -> list[int]:
        """The free queue, next to be allocated first (for tests and debugging)."""
        return [b.block_id for b in self._free]

    def match_prefix(self, block_hashes: Sequence[int]) -> list[Block]:
        """The cached blocks for the leading hashes, up to the first miss; refs unchanged."""
        cached = self._cached
        out: list[Block] = []
        for h in block_hashes:
            block = cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    # ---------------------------------------------------------------------------- mutations

    def acquire(self, blocks: Sequence[Block]) -> None:
        """Take a reference on each block (typically prefix-cache hits)."""
        for block in blocks:
            if block.ref_count == 0:
                self._free.remove(block)
            block.ref_count += 1

    def allocate(self, n: int) -> list[Block] | None:
        """`n` blocks with ref_count 1 and no hash, evicting cached free blocks LRU-first; None
        (and nothing allocated) when fewer than `n` blocks are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        out: list[Block] = []
        evicted: list[int] = []
        hook = self.on_evict
        gone: list[EvictedBlock] = []
        for _ in range(n):
            block = self._free.pop_head()
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                evicted.append(block.block_hash)
                if hook is not None:
                    gone.append(EvictedBlock(block.block_id, block.block_hash, block.parent_hash))
                block.block_hash = None
                block.parent_hash = None
            block.ref_count = 1
            out.append(block)
        if evicted:
            self._emit(BlockRemoved(block_hashes=evicted))
        if gone:
            hook(gone)  # type: ignore[misc]
        return out

    def commit(self, block: Block, block_hash: int, parent_hash: int | None) -> Block:
        """Register a full block under its hash; see commit_many for the duplicate rule."""
        return self.commit_many([block], [block_hash], parent_hash)[0]

    def commit_many(
        self, blocks: Sequence[Block], block_hashes: Sequence[int], parent_hash: int | None
    ) -> list[Block]:
        """Register consecutive full blocks of one sequence (`parent_hash` precedes the first)
        and emit one BlockStored per run of newly cached hashes.

        Returns the block to use for each position. Where a hash is already cached by another
        block, that block is returned and the given one stays uncommitted (no hash, no event):
        one block per hash keeps eviction and events exact. Ref counts are not changed; the
        caller either keeps its private copy or swaps: acquire([returned]); release([given]).
        """
        if len(blocks) != len(block_hashes):
            raise ValueError(f"{len(blocks)} blocks but {len(block_hashes)} hashes")
        result: list[Block] = []
        run: list[int] = []
        run_parent = parent_hash
        parent = parent_hash
        for block, h in zip(blocks, block_hashes):
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} is free; commit needs a reference")
            if block.block_hash is not None and block.block_hash != h:
                raise ValueError(f"block {block.block_id} is already committed as {block.block_hash}")
            existing = self._cached.get(h)
            if existing is not None:
                if run:
                    self._emit(BlockStored(block_hashes=run, parent_hash=run_parent))
                    run = []
                result.append(existing)
            else:
                block.block_hash = h
                block.parent_hash = parent
                self._cached[h] = block
                if not run:
                    run_parent = parent
                run.append(h)
                result.append(block)
            parent = h
        if run:
            self._emit(BlockStored(block_hashes=run, parent_hash=run_parent))
        return result

    def release(self, blocks: Sequence[Block]) -> None:
        """Drop one reference on each block; pass a sequence's blocks in sequence order.

        They are freed in reverse order, so a sequence's last blocks sit nearer the head of the
        free queue and are evicted before its first ones: the head of a prefix is the part other
        requests share (system prompts, earlier turns), and a child block is useless without its
        parent, so evicting tails first keeps the most reusable cache longest. Blocks without a
        hash hold nothing reusable and go to the head, to be reused before any cached block.
        """
        for block in reversed(blocks):
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} released more often than acquired")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.push_head(block)
                else:
                    self._free.push_tail(block)

    def reset(self) -> None:
        """Forget every cached hash and emit AllBlocksCleared. Active blocks stay with their
        holders (their references are theirs to release) but are no longer reusable."""
        for block in self._cached.values():
            block.block_hash = None
            block.parent_hash = None
        self._cached.clear()
        self._emit(AllBlocksCleared())

    def snapshot(self) -> list[KvEventData]:
        """The cached blocks as BlockStored events that a consumer can apply in order: every
        cached ancestor of an event's first hash appears in an earlier event (or the same one)."""
        cached = self._cached
        emitted: set[int] = set()
        events: list[KvEventData] = []
        # Newest first, so that walking up from a leaf gathers whole chains into one event.
        for h in reversed(list(cached)):
            if h in emitted:
                continue
            chain = [h]
            on_chain = {h}
            parent = cached[h].parent_hash
            while parent is not None and parent in cached and parent not in emitted:
                if parent in on_chain:  # only with colliding hashes; never loop on them
                    break
                chain.append(parent)
                on_chain.add(parent)
                parent = cached[parent].parent_hash
            chain.reverse()
            emitted.update(chain)
            events.append(BlockStored(block_hashes=chain, parent_hash=cached[chain[0]].parent_hash))
        return events

    def _emit(self, event: KvEventData) -> None:
        if self._on_event is not None:
            self._on_event(event)
