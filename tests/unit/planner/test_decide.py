"""planner/decide.py: the SLA sizing formulas, the latency feedback, load bands, idle -> the
minimum (zero where allowed), held requests -> one worker, bounds, GPU budget, cooldowns."""

from __future__ import annotations

import math

import pytest

from planner.config import Bounds, PlannerConfig, Role
from planner.decide import Decider, Prediction, erlang_c, p90_wait_s, servers_within, sla_need
from planner.observe import FleetState, PoolState, TrafficStats
from planner.perf_model import DecodePoint, PerfModel, PrefillPoint

MODEL = PerfModel(
    engine="test",
    prefill=[PrefillPoint(100, 0.010), PrefillPoint(1000, 0.100)],  # 10k tokens/s
    decode=[DecodePoint(b, c, 0.010 + 0.001 * b) for b in (1, 10, 40) for c in (100, 1000)],
    max_batch=40,
    kv_capacity_tokens=1_000_000,
)


def config(**kw: object) -> PlannerConfig:
    args: dict[str, object] = dict(
        mode="sla", topology="disagg", ttft_target_s=0.5, itl_target_s=0.030,
        bounds={"prefill": Bounds(0, 10), "decode": Bounds(0, 10), "aggregated": Bounds(1, 10)},
        scale_down_cooldown_s=0.0,
    )
    args.update(kw)
    return PlannerConfig(**args)  # type: ignore[arg-type]


def fleet(rate: float = 0.0, ttft: float | None = None, itl: float | None = None, held: int = 0,
          inflight: int = 0, pools: dict[Role, PoolState] | None = None) -> FleetState:
    return FleetState(TrafficStats(rate, 1000, 100, ttft, itl, inflight, held), pools or {})


def decide(d: Decider, f: FleetState, p: Prediction, current: dict[Role, int], now: float = 100.0):  # type: ignore[no-untyped-def]
    return {x.role: x for x in d.decide(f, p, current, now)}


def test_erlang_c_known_values() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: the utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(2, 2.0) == 1.0 and erlang_c(3, 0.0) == 0.0


def test_p90_wait_and_the_fewest_servers_within_a_budget() -> None:
    # M/M/1 at rho 0.5, s = 1: P(W > t) = 0.5 e^(-0.5 t): p90 at 2 ln 5, halved for M/D/1.
    assert p90_wait_s(1, 0.5, 1.0) == pytest.approx(0.5 * 2 * math.log(5))
    assert p90_wait_s(2, 2.5, 1.0) == math.inf
    n = servers_within(4.5, 0.53, 1.96)
    assert p90_wait_s(n, 4.5, 0.53) <= 1.96 < p90_wait_s(n - 1, 4.5, 0.53)
    assert 4.5 * 0.53 / n <= 0.9
    assert servers_within(0.0, 1.0, 1.0) == 0
    # pooling: one pool of n servers needs fewer than n independent M/D/1 queues would
    assert servers_within(20.0, 0.5, 0.5) < math.ceil(20 * 0.5 / 0.6)


def test_sla_need_from_the_model() -> None:
    p = Prediction(10.0, 1000, 100)
    need = sla_need(MODEL, p, ttft_target_s=0.5, itl_target_s=0.030)
    budget = 0.5 - 0.1
    assert need.prefill_workers == servers_within(10.0, 0.1, budget)
    # ITL 10 ms + 1 ms per stream <= 30 ms -> 20 slots a worker, each stream 100 x 30 ms in one.
    assert need.decode_workers == servers_within(10.0, 3.0, budget) / 20
    assert need.local_workers == servers_within(10.0, 3.1, budget) / 20
    assert sla_need(MODEL, Prediction(0.0, 1000, 100), 0.5, 0.03).prefill_workers == 0


def test_sla_disagg_replicas_are_the_rounded_up_needs() -> None:
    d = Decider(config(), MODEL)
    out = decide(d, fleet(rate=20), Prediction(20.0, 1000, 100), {"prefill": 1, "decode": 1})
    need = sla_need(MODEL, Prediction(20.0, 1000, 100), 0.5, 0.030)
    assert out["prefill"].desired == math.ceil(need.prefill_workers) >= 3
    assert out["decode"].desired == math.ceil(need.decode_workers) >= 2
    assert out["prefill"].reason == out["decode"].reason == "sla_model"


def test_agg_workers_hold_a_slot_for_prefill_and_decode() -> None:
    d = Decider(config(topology="agg"), MODEL)
    out = decide(d, fleet(rate=10), Prediction(10.0, 1000, 100), {"aggregated": 1})
    need = sla_need(MODEL, Prediction(10.0, 1000, 100), 0.5, 0.030)
    assert out["aggregated"].desired == math.ceil(need.local_workers)


def test_ttft_over_target_grows_the_pool_that_holds_the_queue() -> None:
    d = Decider(config(), MODEL)
    p = Prediction(1.0, 1000, 100)  # the model alone asks for one of each
    decode_queue = {"decode": PoolState(workers=1, waiting_requests=5), "prefill": PoolState(workers=1)}
    starting = {"decode": PoolState(workers=1, waiting_requests=5), "prefill": PoolState(workers=1)}
    out = decide(Decider(config(), MODEL), fleet(rate=1, ttft=2.0, pools=starting), p, {"prefill": 1, "decode": 2})
    assert out["decode"].desired == 2  # one worker still starting: no more until it serves
    out = decide(d, fleet(rate=1, ttft=2.0, pools=decode_queue), p, {"prefill": 1, "decode": 1})
    assert (out["decode"].desired, out["decode"].reason) == (2, "ttft_over_target")
    assert out["prefill"].desired == 1
    prefill_queue = {"prefill": PoolState(workers=1, waiting_prefill_tokens=8000, waiting_requests=8),
                     "decode": PoolState(workers=1, waiting_requests=3)}
    out = decide(Decider(config(), MODEL), fleet(rate=1, ttft=2.0, pools=prefill_queue), p, {"prefill": 1, "decode": 1})
    assert (out["prefill"].desired, out["prefill"].reason) == (2, "ttft_over_target")
    assert out["decode"].desired == 1


def test_no_shrinking_while_latency_is_near_its_target() -> None:
    d = Decider(config(), MODEL)
    out = decide(d, fleet(rate=1, ttft=0.45), Prediction(1.0, 1000, 100), {"prefill": 3, "decode": 3})
    assert out["decode"].desired == 3 and out["decode"].reason == "latency_near_target"
    out = decide(d, fleet(rate=1, ttft=0.1, itl=0.01), Prediction(1.0, 1000, 100), {"prefill": 3, "decode": 3})
    assert out["decode"].desired == 1


def test_idle_goes_to_the_minimum_including_zero() -> None:
    d = Decider(config(), MODEL)
    out = decide(d, fleet(), Prediction(0.0, 1000, 100), {"prefill": 2, "decode": 2})
    assert out["prefill"].desired == 0 and out["decode"].desired == 0
    assert out["decode"].reason == "idle"
    agg = Decider(config(topology="agg"), MODEL)
    out = decide(agg, fleet(), Prediction(0.0, 1000, 100), {"aggregated": 3})
    assert (out["aggregated"].desired, out["aggregated"].reason) == (1, "min_replicas")


def test_work_in_flight_is_not_idle() -> None:
    d = Decider(config(), MODEL)
    busy = {"decode": PoolState(workers=1, active_requests=2)}
    out = decide(d, fleet(pools=busy), Prediction(0.0, 1000, 100), {"prefill": 0, "decode": 1})
    assert out["decode"].desired == 1


def test_a_held_request_brings_a_pool_back_from_zero() -> None:
    for mode in ("sla", "load"):
        d = Decider(config(mode=mode), MODEL)
        out = decide(d, fleet(held=1), Prediction(0.0, 0, 0), {"prefill": 0, "decode": 0})
        assert (out["decode"].desired, out["decode"].reason) == (1, "held_request")
        assert out["prefill"].desired == 0  # prefill workers alone serve nobody


def test_load_mode_bands() -> None:
    d = Decider(config(mode="load", queue_high=2, queue_low=0.5, kv_high=0.8, kv_low=0.3), None)
    p = Prediction(5.0, 100, 100)
    queued = {"decode": PoolState(workers=2, waiting_requests=10), "prefill": PoolState(workers=1, kv_usage=0.9)}
    out = decide(d, fleet(rate=5, pools=queued), p, {"prefill": 1, "decode": 2})
    assert (out["decode"].desired, out["decode"].reason) == (3, "queue_high")
    assert (out["prefill"].desired, out["prefill"].reason) == (2, "kv_high")
    quiet = {"decode": PoolState(workers=3, kv_usage=0.1, active_requests=1)}
    out = decide(d, fleet(rate=5, pools=quiet), p, {"prefill": 0, "decode": 3})
    assert (out["decode"].desired, out["decode"].reason) == (2, "load_low")


def test_bounds_budget_and_cooldowns() -> None:
    cfg = config(bounds={"prefill": Bounds(0, 3), "decode": Bounds(1, 10)}, gpu_budget=8,
                 scale_up_cooldown_s=10, scale_down_cooldown_s=60)
    d = Decider(cfg, MODEL)
    big = Prediction(100.0, 1000, 100)
    out = decide(d, fleet(rate=100), big, {"prefill": 1, "decode": 1}, now=0.0)
    assert out["prefill"].desired == 3 and out["prefill"].reason == "max_replicas"
    assert out["prefill"].desired + out["decode"].desired == 8  # the GPU budget
    assert out["decode"].reason == "gpu_budget"
    for x in out.values():
        d.applied(x, 0.0)
    out = decide(d, fleet(rate=100), big, {"prefill": 3, "decode": 5}, now=5.0)
    assert out["decode"].desired == 5 and out["decode"].reason in ("cooldown", "gpu_budget")
    out = decide(d, fleet(), Prediction(0.0, 0, 0), {"prefill": 3, "decode": 5}, now=30.0)
    assert out["decode"].desired == 5 and out["decode"].reason == "cooldown"  # scale-down cooldown
    out = decide(d, fleet(), Prediction(0.0, 0, 0), {"prefill": 3, "decode": 5}, now=61.0)
    # The change at 0 is 60 s old, but the pool wanted more at 5 s: the window holds it.
    assert out["decode"].desired == 5 and out["decode"].reason == "cooldown"
    out = decide(d, fleet(), Prediction(0.0, 0, 0), {"prefill": 3, "decode": 5}, now=91.0)
    assert (out["prefill"].desired, out["decode"].desired) == (0, 1)


def test_one_quiet_interval_does_not_shrink_a_pool() -> None:
    d = Decider(config(scale_down_cooldown_s=10), MODEL)
    busy, quiet = Prediction(30.0, 1000, 100), Prediction(1.0, 1000, 100)
    decide(d, fleet(rate=30, ttft=0.1, itl=0.01), busy, {"prefill": 4, "decode": 5}, now=0.0)
    out = decide(d, fleet(rate=1, ttft=0.1, itl=0.01), quiet, {"prefill": 4, "decode": 5}, now=1.0)
    assert out["decode"].desired == 5 and out["decode"].wanted == 1
    out = decide(d, fleet(rate=1, ttft=0.1, itl=0.01), quiet, {"prefill": 4, "decode": 5}, now=11.0)
    assert out["decode"].desired == 1


def test_shrinking_needs_measured_latency_or_no_traffic() -> None:
    d = Decider(config(), MODEL)
    # Traffic, but no first token seen in the interval: no evidence that fewer workers suffice.
    out = decide(d, fleet(rate=1, inflight=3), Prediction(1.0, 1000, 100), {"prefill": 3, "decode": 3})
    assert out["decode"].desired == 3


def test_sla_mode_needs_a_model() -> None:
    with pytest.raises(ValueError):
        Decider(config(), None)


def test_short_prompts_in_disagg_count_toward_the_decode_pool() -> None:
    d = Decider(config(local_prefill_below_tokens=512), MODEL)
    p = Prediction(30.0, 200, 100)
    need = sla_need(MODEL, p, 0.5, 0.030)
    out = decide(d, fleet(rate=30), p, {"prefill": 0, "decode": 1})
    assert out["prefill"].desired == 0
    assert out["decode"].desired == math.ceil(need.local_workers)
