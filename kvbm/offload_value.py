"""Whether copying evicted blocks down to a tier pays for itself. Keeping a tier costs every
block offloaded to it: the scheduler's bookkeeping and the model thread's copy launches sit on
the step's critical path whether or not the block is ever read back. It pays only through hits:
a hit saves recomputing the block's tokens, less what reading it back costs. A small host tier
that churns (blocks evicted before anyone asks for them) or a disk slower than recompute is
all cost: on one H100 such tiers made multi-turn TTFT 1.2-1.4x worse than no tier
(benchmarks/RESULTS.md, "What keeping a tier costs").

So, per tier, measured online: hits per offloaded block (both counts decayed per offloaded
block, so about the last `window` offloads count), what a hit saves (from the onboard cost
model: recompute of a block minus its read), and the host seconds each offloaded block costs
(TieredCache.evicted's bookkeeping plus the executor's launches, on the engine's clock). A tier
whose offloads are worth less than they cost is bypassed: an eviction batch goes to it only one
time in `explore_every`, so its hit rate keeps being measured and a workload that starts
re-using blocks turns it back on. A tier whose reads cost more than recompute (its hits are
declined) is worth nothing whatever its hit rate, and takes no batch at all until recompute gets
dearer than its reads (on one H100 a 1.1B model's disk took ~1,700 exploring writes a run and
read back 14-20 of its hits), from the first eviction on once recompute is measured: a disk
tier's read cost is known from its start (kvbm/disk_probe.py). Any other is judged on its hit
rate only once it has taken as many offloads as it holds (its first blocks' hits come later),
and never before recompute and the offload cost are measured; until then it is taken as one hit
per offload, so a tier whose hit saves less than an offload costs is explored, not fed. Pure
bookkeeping, on the scheduler's thread."""

from __future__ import annotations

from dataclasses import dataclass

# Offloads weigh ~1/window each: decay per offloaded block.
WINDOW = 2048
# The fewest offloads a tier's hit rate is judged on (its capacity if larger).
MIN_OFFLOADS = 256
EXPLORE_EVERY = 8
# The cost per offloaded block: weight of the newest batch's sample.
COST_ALPHA = 0.1


@dataclass(slots=True)
class _TierCounts:
    offloads: float = 0.0  # decayed
    hits: float = 0.0  # decayed alike
    total_offloads: int = 0
    bypassed_batches: int = 0


class OffloadValue:
    def __init__(self, enabled: bool = True, window: int = WINDOW, min_offloads: int = MIN_OFFLOADS,
                 explore_every: int = EXPLORE_EVERY) -> None:
        self.enabled = enabled
        self.decay = 1.0 - 1.0 / window
        self.min_offloads = min_offloads
        self.explore_every = max(1, explore_every)
        self._tiers: dict[str, _TierCounts] = {}
        # part -> (seconds, blocks), each an EWMA over the part's batches: their ratio is the
        # cost per offloaded block, each batch weighed by its blocks.
        self._cost_parts: dict[str, tuple[float, float]] = {}

    def _counts(self, tier: str) -> _TierCounts:
        counts = self._tiers.get(tier)
        if counts is None:
            counts = self._tiers[tier] = _TierCounts()
        return counts

    # ------------------------------------------------------------------------- measurements

    def offloaded(self, tier: str, blocks: int) -> None:
        if blocks <= 0:
            return
        c = self._counts(tier)
        keep = self.decay**blocks
        c.offloads = c.offloads * keep + blocks
        c.hits *= keep
        c.total_offloads += blocks

    def hit(self, tier: str, blocks: int) -> None:
        """`blocks` of `tier` were onboarded (read back instead of recomputed)."""
        if blocks > 0:
            self._counts(tier).hits += blocks

    def observe_cost(self, part: str, seconds: float, blocks: int) -> None:
        """Offloading `blocks` cost `seconds` of the engine's critical path in `part` (the
        scheduler's bookkeeping, the executor's launches): the parts' per-block costs add. A
        batch's cost is mostly fixed (a plan's launches, a poll of the disk writer), so an average
        of per-batch ratios would count a batch of one block as if every block cost that batch's
        time (on one H100 that put an offload at 4-5x what the blocks cost in all): the
        seconds and the blocks are averaged apart."""
        if blocks <= 0 or seconds < 0:
            return
        old = self._cost_parts.get(part)
        if old is None:
            self._cost_parts[part] = (seconds, float(blocks))
        else:
            s, b = old
            self._cost_parts[part] = (s + COST_ALPHA * (seconds - s), b + COST_ALPHA * (blocks - b))

    def cost_s(self) -> float | None:
        """Seconds of the critical path per offloaded block (None: not measured)."""
        parts = self._cost_parts
        return sum(s / b for s, b in parts.values()) if parts else None

    # ----------------------------------------------------------------------------- decision

    def hit_rate(self, tier: str, judge_after: int = 0) -> float | None:
        """Hits per offloaded block, once `tier` has taken max(min_offloads, judge_after)."""
        c = self._tiers.get(tier)
        if c is None or c.total_offloads < max(self.min_offloads, judge_after) or c.offloads <= 0:
            return None
        return c.hits / c.offloads

    def worth(self, tier: str, saved_per_hit_s: float | None, judge_after: int = 0) -> bool:
        """Whether offloading to `tier` pays, a hit saving `saved_per_hit_s` (None: unknown);
        `judge_after`: the tier's capacity in blocks."""
        cost = self.cost_s()
        if not self.enabled or saved_per_hit_s is None:
            return True
        if saved_per_hit_s <= 0:
            # Its hits are recomputed anyway: worth only what it costs, which is never less than
            # nothing (so not before that is measured either: a disk probed dearer than
            # recompute takes not even the first batch).
            return cost is not None and cost <= 0
        if cost is None:
            return True
        rate = self.hit_rate(tier, judge_after)
        if rate is None:
            # Not judged yet (a large tier's first blocks are hit long after they are written):
            # taken as one hit per offload, a tier whose hit cannot repay even its own offload.
            # On one H100 a disk read within 2 us of recompute took 810 writes a run, before
            # its first reads corrected the estimate, and read back 14-18 of its 360-530 hits.
            return saved_per_hit_s >= cost
        return rate * saved_per_hit_s >= cost

    def keep_batch(self, tier: str, saved_per_hit_s: float | None, judge_after: int = 0) -> bool:
        """Whether this eviction batch goes to `tier`: always when the tier pays, never when a
        hit would save nothing, else one batch in `explore_every` (whole batches, so kept
        prefixes stay whole and hittable)."""
        if self.worth(tier, saved_per_hit_s, judge_after):
            return True
        if saved_per_hit_s is not None and saved_per_hit_s <= 0:
            # Its hits would be recomputed whatever its hit rate, so exploring measures nothing
            # the decision needs: the tier comes back when recompute gets dearer than its reads
            # (the onboard cost model keeps measuring recompute), judged afresh on its hits.
            return False
        c = self._counts(tier)
        c.bypassed_batches += 1
        return c.bypassed_batches % self.explore_every == 0

    def snapshot(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"offload_cost_s_per_block": self.cost_s()}
        for tier in self._tiers:
            out[f"{tier}_hits_per_offload"] = self.hit_rate(tier)
        return out
