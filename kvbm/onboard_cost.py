"""Whether a prompt's lower-tier hits are worth onboarding: reading a block back from a tier must
cost the request less than recomputing its tokens, or the tier makes the request slower than no
tier at all (a disk read of a small GQA model's block can take longer than its prefill). Both
sides are measured online. Per tier, an exponentially weighted linear fit of seconds against
bytes (a latency and a bandwidth) over what requests actually waited: a host copy's time on the
copy stream, a disk hit's time from the start of its reads to its request's admission. For
recompute, the engine's prefill seconds per token over its recent prefill-sized steps, a low
quantile: steps also carry KVBM copies, disk spills and reader threads' contention, which a
recomputed token would not add. Until a tier has been read from, its estimate is a prior: the
disk's is what kvbm/disk_probe.py measured when the tier opened (else the configured bandwidth).
Pure bookkeeping: the engines report what they measured, TieredCache.lookup asks `choose`."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

# Weight of the newest sample: about the last 20 transfers count.
ALPHA = 0.05
# Recompute: steps of at least this many tokens, the last PREFILL_WINDOW of them, this quantile.
PREFILL_MIN_TOKENS = 64
PREFILL_WINDOW = 64
PREFILL_QUANTILE = 0.25


class LinearRate:
    """seconds ~= latency_s + per_unit_s * units, fitted with exponential forgetting. Until
    the samples' units vary enough to separate the two terms, all of the cost is taken as
    per unit (an upper bound on the marginal cost of large transfers, exact for the sizes
    seen). `prior_per_unit_s` stands until the first sample; None: unknown."""

    __slots__ = ("alpha", "samples", "_mx", "_my", "_mxx", "_mxy", "_prior", "_lock", "_fitted")

    def __init__(self, prior_per_unit_s: float | None = None, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self.samples = 0
        self._mx = self._my = self._mxx = self._mxy = 0.0
        self._prior = prior_per_unit_s
        # Disk reads report from reader threads while the scheduler reads the fit.
        self._lock = threading.Lock()
        # fit()'s answer until the next sample or prior: the scheduler asks for every eviction
        # batch, samples come once per transfer.
        self._fitted: tuple[float, float] | None = None

    def observe(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds < 0:
            return
        with self._lock:
            # The first sample sets the means; later ones move them by `alpha`.
            a = 1.0 if self.samples == 0 else self.alpha
            self._mx += a * (units - self._mx)
            self._my += a * (seconds - self._my)
            self._mxx += a * (units * units - self._mxx)
            self._mxy += a * (units * seconds - self._mxy)
            self.samples += 1
            self._fitted = None

    def set_prior(self, per_unit_s: float) -> None:
        """Replace the prior (a measurement taken outside serving); the first sample still
        replaces it."""
        with self._lock:
            self._prior = per_unit_s
            self._fitted = None

    def fit(self) -> tuple[float, float] | None:
        """(latency_s, per_unit_s), or None while nothing was measured and there is no prior."""
        with self._lock:
            if self.samples == 0:
                return None if self._prior is None else (0.0, self._prior)
            if self._fitted is None:
                self._fitted = self._solve()
            return self._fitted

    def _solve(self) -> tuple[float, float]:
        mx, my = self._mx, self._my
        var = self._mxx - mx * mx
        average = my / mx
        # A spread under ~10% of the mean size cannot separate latency from bandwidth.
        if var <= 0.01 * mx * mx:
            return 0.0, average
        slope = (self._mxy - mx * my) / var
        intercept = my - slope * mx
        if slope <= 0 or intercept < 0:  # noise: fall back to the plain average
            return 0.0, average
        return intercept, slope

    def cost_s(self, units: float) -> float | None:
        fitted = self.fit()
        if fitted is None:
            return None
        latency, per_unit = fitted
        return latency + per_unit * units if units > 0 else 0.0

    def per_unit_s(self) -> float | None:
        fitted = self.fit()
        return None if fitted is None else fitted[1]

    def shared_cost_s(self, units: float) -> float | None:
        """cost_s of `units` moved within a transfer of the mean size measured: its share of
        that transfer's latency (all of it when transfers are no larger) plus its own bytes."""
        fitted = self.fit()
        if fitted is None:
            return None
        latency, per_unit = fitted
        with self._lock:
            mean = self._mx if self.samples else 0.0
        share = units / mean if mean > units else 1.0
        return latency * share + per_unit * units


class PrefillRate:
    """Seconds per prompt token, from steps' (tokens, seconds): the `quantile` of seconds/token
    over the last `window` steps of at least `min_tokens` tokens (decode-sized steps are all
    fixed cost). A step's fixed cost is spread over its tokens, so this slightly overstates
    the marginal cost of a token; the low quantile leaves out steps slowed by other work."""

    __slots__ = ("min_tokens", "quantile", "_samples", "_lock", "_quantile_s")

    def __init__(self, min_tokens: int = PREFILL_MIN_TOKENS, window: int = PREFILL_WINDOW,
                 quantile: float = PREFILL_QUANTILE) -> None:
        self.min_tokens = min_tokens
        self.quantile = quantile
        self._samples: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._quantile_s: float | None = None  # per_unit_s() until the next sample: sorted once

    @property
    def samples(self) -> int:
        return len(self._samples)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens >= self.min_tokens and seconds > 0:
            with self._lock:
                self._samples.append(seconds / tokens)
                self._quantile_s = None

    def per_unit_s(self) -> float | None:
        with self._lock:
            if self._quantile_s is None and self._samples:
                ordered = sorted(self._samples)
                self._quantile_s = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            return self._quantile_s


class OnboardCostModel:
    """Per tier, the measured cost of bringing bytes to the device: `host` is a pinned host ->
    device copy; `disk` a read into pinned staging (then a host copy too). Recompute is the
    engine's measured seconds per prompt token. With `enabled` false every hit is onboarded
    (the behaviour before the model existed)."""

    def __init__(self, host_gbps: float, disk_gbps: float, enabled: bool = True) -> None:
        self.enabled = enabled
        # Config bandwidths are the priors: optimistic, so a tier is tried (and measured)
        # before it can be judged; the fits replace them after one transfer. A disk tier's is
        # replaced at start by what its probe measured (prior_read).
        self.reads: dict[str, LinearRate] = {
            "host": LinearRate(1.0 / (host_gbps * 1e9)),
            "disk": LinearRate(1.0 / (disk_gbps * 1e9)),
        }
        self.prefill = PrefillRate()

    # ------------------------------------------------------------------------- measurements

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        """`nbytes` of `tier` cost a request `seconds`: host, the copy to the device; disk,
        from the start of the reads to the request's admission (a copy up follows)."""
        rate = self.reads.get(tier)
        if rate is not None:
            rate.observe(nbytes, seconds)

    def prior_read(self, tier: str, nbytes: int, seconds: float) -> None:
        """Reading `nbytes` of `tier` took `seconds` outside serving (kvbm/disk_probe.py): the
        tier's estimate until its first real read, which replaces it (thread-safe)."""
        rate = self.reads.get(tier)
        if rate is not None and nbytes > 0 and seconds > 0:
            rate.set_prior(seconds / nbytes)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One engine step computed `num_tokens` tokens in `seconds`."""
        self.prefill.observe(num_tokens, seconds)

    # ----------------------------------------------------------------------------- decision

    def recompute_s(self, num_tokens: int) -> float | None:
        """Marginal seconds to compute `num_tokens` more prompt tokens in a step."""
        per_token = self.prefill.per_unit_s()
        return None if per_token is None else per_token * num_tokens

    def block_onboard_s(self, tier: str, block_bytes: int) -> float:
        """What onboarding one block of `tier` costs as blocks come: read with the other blocks
        of a request (a disk block then copied up, as choose prices it), so sharing each transfer's
        latency with them. Per-block latency would price a disk whose reads take milliseconds
        to start, and then stream, as if every block paid the whole start."""
        total = 0.0
        for name in ("disk", "host") if tier == "disk" else ("host",):
            cost = self.reads[name].shared_cost_s(block_bytes)
            total += cost or 0.0
        return total

    def choose(self, tiers: Sequence[str], block_bytes: int, tokens_per_block: int, sharing: float = 1.0) -> int:
        """How many leading hits (their tiers, in prefix order) to onboard: the count whose
        onboard cost plus the recompute of the hits after it is least; ties onboard more (it
        spares the GPU). Every hit until the engine's prefill cost is measured. `sharing`:
        how many requests a recomputed token delays (those in the steps it lengthens; a read
        delays only its own request), 1 to weigh the requester's time alone."""
        n = len(tiers)
        if not self.enabled or n == 0:
            return n
        per_token = self.prefill.per_unit_s()
        if per_token is None:
            return n
        host_fit, disk_fit = self.reads["host"].fit(), self.reads["disk"].fit()
        block_s = per_token * tokens_per_block * max(1.0, sharing)
        best_k, best_s = 0, n * block_s
        host = disk = 0
        for k, tier in enumerate(tiers, start=1):
            if tier == "disk":
                disk += 1
            else:
                host += 1
            total = _onboard_s(host_fit, disk_fit, host, disk, block_bytes) + (n - k) * block_s
            if total <= best_s:
                best_k, best_s = k, total
        return best_k

    def can_pay(self, tier: str, block_bytes: int, tokens_per_block: int, sharing: float = 1.0) -> bool:
        """Whether choose() could onboard any hit of `tier` at the current estimates: its bytes'
        streaming cost per block (a disk block then copied up) below recomputing the block.
        A transfer's latency only adds to that, so where streaming alone loses, no run of
        hits of any length wins. True while the prefill cost is unmeasured (choose onboards)."""
        if not self.enabled:
            return True
        per_token = self.prefill.per_unit_s()
        if per_token is None:
            return True
        per_byte = 0.0
        for name in ("disk", "host") if tier == "disk" else ("host",):
            fitted = self.reads[name].fit()
            per_byte += fitted[1] if fitted is not None else 0.0
        return per_byte * block_bytes < per_token * tokens_per_block * max(1.0, sharing)

    def snapshot(self) -> dict[str, float | None]:
        """Current estimates (for metrics and benchmarks): GB/s and latency per tier,
        recompute tokens per second."""
        out: dict[str, float | None] = {}
        for tier, rate in self.reads.items():
            fitted = rate.fit()
            out[f"{tier}_gbps"] = None if fitted is None else 1e-9 / fitted[1]
            out[f"{tier}_latency_s"] = None if fitted is None else fitted[0]
        per_token = self.prefill.per_unit_s()
        out["recompute_tokens_per_s"] = None if not per_token else 1.0 / per_token
        return out


def _onboard_s(host: tuple[float, float] | None, disk: tuple[float, float] | None, host_blocks: int,
               disk_blocks: int, block_bytes: int) -> float:
    total = 0.0
    if disk_blocks and disk is not None:
        total += disk[0] + disk[1] * disk_blocks * block_bytes
    if (host_blocks + disk_blocks) and host is not None:
        total += host[0] + host[1] * (host_blocks + disk_blocks) * block_bytes
    return total
