"""Router flags in Dynamo's spelling (with DYN_* environment fallbacks), declared once, and the
frozen RouterConfig the rest of the router takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dynamo.config import env_default
from router.base import ROUTER_MODES


@dataclass(frozen=True, slots=True)
class RouterConfig:
    kv_block_size: int = 16  # tokens per KV block; must match the engines' block size
    # Weight of prefill cost against decode load (cost.py). Dynamo's default is 1; for long
    # shared prompts one uncached block costs far more time than one more active block, and
    # two sweeps (benchmarks/RESULTS.md, "Overlap weight sweep", "SGLang's router") found 8
    # better than 1, 2 and 4 on every trace, and on par with 16.
    overlap_score_weight: float = 8.0
    temperature: float = 0.0  # 0: cheapest worker; > 0: softmax sampling
    use_kv_events: bool = True  # False: approximate mode, caches predicted from own decisions
    approx_ttl_s: float = 120.0  # approximate mode: how long a sent block counts as cached
    approx_capacity_blocks: int = 65536  # approximate mode: predicted blocks kept per worker
    # With KV events: a request's blocks also count as cached where it was just sent, for this
    # long (0: off), so a burst sharing a prefix follows the first request before its events
    # arrive instead of cold-starting the prefix on several workers.
    prediction_ttl_s: float = 5.0
    snapshot_retry_s: float = 5.0  # a snapshot request unanswered this long is sent again
    seed: int | None = None  # for reproducible tie-breaks and sampling (tests, benchmarks)
    # A prompt block a worker holds only in KVBM's host / disk tier counts this fraction of a
    # device-cached block (it is copied back, not recomputed, but the copy costs time).
    host_hit_weight: float = 0.5
    disk_hit_weight: float = 0.25

    def __post_init__(self) -> None:
        if self.kv_block_size <= 0:
            raise ValueError(f"kv_block_size must be positive, got {self.kv_block_size}")
        if self.overlap_score_weight < 0:
            raise ValueError("overlap_score_weight must be >= 0")
        if self.prediction_ttl_s < 0:
            raise ValueError("prediction_ttl_s must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not (0 <= self.host_hit_weight <= 1 and 0 <= self.disk_hit_weight <= 1):
            raise ValueError("host_hit_weight and disk_hit_weight must be in [0, 1]")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        return cls(
            kv_block_size=args.kv_cache_block_size,
            overlap_score_weight=args.kv_overlap_score_weight,
            temperature=args.router_temperature,
            use_kv_events=args.kv_events,
            approx_ttl_s=args.router_approx_ttl_s,
            approx_capacity_blocks=args.router_approx_capacity_blocks,
            prediction_ttl_s=getattr(args, "router_prediction_ttl_s", cls().prediction_ttl_s),
            seed=args.router_seed,
            host_hit_weight=getattr(args, "kv_host_hit_weight", cls().host_hit_weight),
            disk_hit_weight=getattr(args, "kv_disk_hit_weight", cls().disk_hit_weight),
        )


def _env_bool(name: str, default: bool) -> bool:
    value = env_default(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _env_seed() -> int | None:
    value = env_default("DYN_ROUTER_SEED")
    return int(value) if value else None


def add_router_args(parser: argparse.ArgumentParser) -> None:
    d = RouterConfig()
    group = parser.add_argument_group("router")
    group.add_argument(
        "--router-mode",
        choices=ROUTER_MODES,
        default=env_default("DYN_ROUTER_MODE", "round-robin"),
        help="how requests are spread over a model's workers [env DYN_ROUTER_MODE]",
    )
    group.add_argument(
        "--kv-overlap-score-weight",
        type=float,
        default=float(env_default("DYN_KV_OVERLAP_SCORE_WEIGHT", str(d.overlap_score_weight))),
        help="weight of prefill cost (uncached prompt blocks) against decode load (default "
        f"{d.overlap_score_weight:g}; Dynamo's is 1); 0 = pure load balancing "
        "[env DYN_KV_OVERLAP_SCORE_WEIGHT]",
    )
    group.add_argument(
        "--router-temperature",
        type=float,
        default=float(env_default("DYN_ROUTER_TEMPERATURE", str(d.temperature))),
        help="0 = always the cheapest worker; > 0 = softmax sampling [env DYN_ROUTER_TEMPERATURE]",
    )
    group.add_argument(
        "--kv-cache-block-size",
        type=int,
        default=int(env_default("DYN_KV_CACHE_BLOCK_SIZE", str(d.kv_block_size))),
        help="tokens per KV block when the workers do not register one [env DYN_KV_CACHE_BLOCK_SIZE]",
    )
    group.add_argument(
        "--kv-events",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("DYN_KV_EVENTS", d.use_kv_events),
        help="track caches from the workers' KV events; --no-kv-events predicts them from "
        "the router's own decisions (approximate mode) [env DYN_KV_EVENTS]",
    )
    group.add_argument(
        "--router-approx-ttl-s",
        type=float,
        default=float(env_default("DYN_ROUTER_APPROX_TTL_S", str(d.approx_ttl_s))),
        help="approximate mode: seconds a routed block counts as cached [env DYN_ROUTER_APPROX_TTL_S]",
    )
    group.add_argument(
        "--router-approx-capacity-blocks",
        type=int,
        default=int(
            env_default("DYN_ROUTER_APPROX_CAPACITY_BLOCKS", str(d.approx_capacity_blocks))
        ),
        help="approximate mode: predicted blocks kept per worker [env DYN_ROUTER_APPROX_CAPACITY_BLOCKS]",
    )
    group.add_argument(
        "--router-prediction-ttl-s",
        type=float,
        default=float(env_default("DYN_ROUTER_PREDICTION_TTL_S", str(d.prediction_ttl_s))),
        help="with KV events: seconds a request's blocks count as cached on the worker it was "
        "just sent to, before its events arrive (0: off) [env DYN_ROUTER_PREDICTION_TTL_S]",
    )
    group.add_argument(
        "--kv-host-hit-weight",
        type=float,
        default=float(env_default("DYN_KV_HOST_HIT_WEIGHT", str(d.host_hit_weight))),
        help="a prompt block cached only in a worker's host-memory tier counts this fraction "
        "of a device-cached block [env DYN_KV_HOST_HIT_WEIGHT]",
    )
    group.add_argument(
        "--kv-disk-hit-weight",
        type=float,
        default=float(env_default("DYN_KV_DISK_HIT_WEIGHT", str(d.disk_hit_weight))),
        help="likewise for a worker's disk tier [env DYN_KV_DISK_HIT_WEIGHT]",
    )
    group.add_argument(
        "--router-seed",
        type=int,
        default=_env_seed(),
        help="seed for tie-breaks and temperature sampling [env DYN_ROUTER_SEED]",
    )
