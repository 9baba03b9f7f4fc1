"""Router flags in Dynamo's spelling (with DYN_* environment fallbacks), declared once
(dynamo/flags.py), and the frozen RouterConfig the rest of the router takes. Defaults are the
RouterConfig's own."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dynamo.flags import Flag, FlagGroup
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
    # Session affinity (router/session.py): a request carrying a session id goes to the worker
    # its session is pinned to, for this long after the session's last request (0: off).
    session_ttl_s: float = 300.0
    # The pinned worker is overloaded, and the request scored normally, when its cost
    # (router/cost.py, its cached prefix counted) exceeds this multiple of the cheapest one's.
    session_overload_ratio: float = 1.5
    # ...and by more than this many blocks of prefill: near idle, costs are a few blocks, and a
    # load report that still shows the session's previous turn would pass any ratio by itself.
    session_overload_min_blocks: float = 8.0

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
        if self.session_ttl_s < 0:
            raise ValueError("session_ttl_s must be >= 0")
        if self.session_overload_ratio < 1:
            raise ValueError("session_overload_ratio must be >= 1")
        if self.session_overload_min_blocks < 0:
            raise ValueError("session_overload_min_blocks must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        return cls(
            kv_block_size=args.kv_cache_block_size,
            overlap_score_weight=args.kv_overlap_score_weight,
            temperature=args.router_temperature,
            use_kv_events=args.kv_events,
            approx_ttl_s=args.router_approx_ttl_s,
            approx_capacity_blocks=args.router_approx_capacity_blocks,
            prediction_ttl_s=args.router_prediction_ttl_s,
            seed=args.router_seed,
            host_hit_weight=args.kv_host_hit_weight,
            disk_hit_weight=args.kv_disk_hit_weight,
            session_ttl_s=args.router_session_affinity_ttl_s,
            session_overload_ratio=args.router_session_overload_ratio,
            session_overload_min_blocks=args.router_session_overload_min_blocks,
        )


_D = RouterConfig()

# The header NVIDIA Dynamo's frontend reads for its session affinity (and aiperf sends).
SESSION_HEADER = "x-dynamo-session-id"

ROUTER_FLAGS = FlagGroup(
    "router",
    [
        Flag(
            "--router-mode",
            "how requests are spread over a model's workers (docs/routing.md)",
            default="round-robin",
            env="DYN_ROUTER_MODE",
            choices=ROUTER_MODES,
        ),
        Flag(
            "--kv-overlap-score-weight",
            "weight of prefill cost (uncached prompt blocks) against decode load (Dynamo's is 1); "
            "0 = pure load balancing",
            default=_D.overlap_score_weight,
            env="DYN_KV_OVERLAP_SCORE_WEIGHT",
            type=float,
        ),
        Flag(
            "--router-temperature",
            "0 = always the cheapest worker; > 0 = softmax sampling over the costs",
            default=_D.temperature,
            env="DYN_ROUTER_TEMPERATURE",
            type=float,
        ),
        Flag(
            "--kv-cache-block-size",
            "tokens per KV block when the workers do not register one",
            default=_D.kv_block_size,
            env="DYN_KV_CACHE_BLOCK_SIZE",
            type=int,
        ),
        Flag(
            "--kv-events",
            "track caches from the workers' KV events; --no-kv-events predicts them from the "
            "router's own decisions (approximate mode)",
            default=_D.use_kv_events,
            env="DYN_KV_EVENTS",
            type=bool,
        ),
        Flag(
            "--router-approx-ttl-s",
            "approximate mode: seconds a routed block counts as cached",
            default=_D.approx_ttl_s,
            env="DYN_ROUTER_APPROX_TTL_S",
            type=float,
        ),
        Flag(
            "--router-approx-capacity-blocks",
            "approximate mode: predicted blocks kept per worker",
            default=_D.approx_capacity_blocks,
            env="DYN_ROUTER_APPROX_CAPACITY_BLOCKS",
            type=int,
        ),
        Flag(
            "--router-prediction-ttl-s",
            "with KV events: seconds a request's blocks count as cached on the worker it was just "
            "sent to, before its events arrive (0: off)",
            default=_D.prediction_ttl_s,
            env="DYN_ROUTER_PREDICTION_TTL_S",
            type=float,
        ),
        Flag(
            "--kv-host-hit-weight",
            "a prompt block cached only in a worker's host-memory tier counts this fraction of a "
            "device-cached block",
            default=_D.host_hit_weight,
            env="DYN_KV_HOST_HIT_WEIGHT",
            type=float,
        ),
        Flag(
            "--kv-disk-hit-weight",
            "likewise for a worker's disk tier",
            default=_D.disk_hit_weight,
            env="DYN_KV_DISK_HIT_WEIGHT",
            type=float,
        ),
        Flag(
            "--router-session-affinity-ttl-s",
            "kv mode: a request with a session id goes to its session's worker while that worker "
            "lives and is not overloaded; the pin lasts this many seconds after the session's last "
            "request (0: off)",
            default=_D.session_ttl_s,
            env="DYN_ROUTER_SESSION_AFFINITY_TTL_S",
            type=float,
        ),
        Flag(
            "--router-session-overload-ratio",
            "a session's worker counts as overloaded (the request is scored normally and the "
            "session re-pinned) when its KV routing cost exceeds this multiple of the cheapest "
            "worker's",
            default=_D.session_overload_ratio,
            env="DYN_ROUTER_SESSION_OVERLOAD_RATIO",
            type=float,
        ),
        Flag(
            "--router-session-overload-min-blocks",
            "...and exceeds it by more than this many KV blocks of prefill (near idle, a load "
            "report still showing the session's previous turn would pass any ratio)",
            default=_D.session_overload_min_blocks,
            env="DYN_ROUTER_SESSION_OVERLOAD_MIN_BLOCKS",
            type=float,
        ),
        Flag(
            "--router-session-header",
            "frontend: the request header that carries the session id (Dynamo's clients send "
            "x-dynamo-session-id)",
            default=SESSION_HEADER,
            env="DYN_ROUTER_SESSION_HEADER",
        ),
        Flag(
            "--router-session-from-user",
            "frontend: a request without the session header uses the OpenAI `user` field as its "
            "session id",
            default=False,
            env="DYN_ROUTER_SESSION_FROM_USER",
            type=bool,
        ),
        Flag(
            "--router-seed",
            "seed for tie-breaks and temperature sampling (unset: random)",
            default=_D.seed,
            env="DYN_ROUTER_SEED",
            type=int,
        ),
    ],
)


def add_router_args(parser: argparse.ArgumentParser, *, default_mode: str | None = None) -> None:
    """The router's flags; `default_mode` is an entry point's own default for --router-mode."""
    ROUTER_FLAGS.add_to(parser, defaults={} if default_mode is None else {"router_mode": default_mode})
