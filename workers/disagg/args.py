"""Flags of the prefill and decode roles (DYN_DISAGG_* / DYN_KV_TRANSFER_* fallbacks) and the
frozen DisaggConfig they become."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dynamo.config import env_default
from kvbm.transfer.backends import BACKEND_CHOICES

# Backends an engine brings itself, not the transfer agent: vLLM's own NixlConnector.
ENGINE_BACKEND_CHOICES = ("vllm-nixl",)
TRANSFER_BACKEND_CHOICES = BACKEND_CHOICES + ENGINE_BACKEND_CHOICES


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    prefill_component: str = "prefill"  # where prefill workers serve, publish KV events and load
    min_prefill_tokens: int = 512  # uncached prompt tokens below this: prefill on the decode worker
    max_prefill_queue_tokens: int = 65536  # prefill pool busier than this: prefill locally
    prefill_timeout_s: float = 30.0  # remote prefill + transfer past this: prefill locally
    kv_transfer_backend: str = "auto"
    # Address the transfer listener binds and advertises; None: every interface, advertising
    # the default route's address (what peers on other hosts reach), like the request plane.
    kv_transfer_host: str | None = None
    kv_link_gbs: float = 25.0  # the mocker's simulated link, GB/s

    def __post_init__(self) -> None:
        if self.kv_transfer_backend not in TRANSFER_BACKEND_CHOICES:
            raise ValueError(f"kv_transfer_backend must be one of {TRANSFER_BACKEND_CHOICES}")
        if self.prefill_timeout_s <= 0 or self.kv_link_gbs <= 0:
            raise ValueError("prefill_timeout_s and kv_link_gbs must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DisaggConfig:
        return cls(
            prefill_component=args.disagg_prefill_component,
            min_prefill_tokens=args.disagg_min_prefill_tokens,
            max_prefill_queue_tokens=args.disagg_max_prefill_queue,
            prefill_timeout_s=args.disagg_prefill_timeout_s,
            kv_transfer_backend=args.kv_transfer_backend,
            kv_transfer_host=args.kv_transfer_host,
            kv_link_gbs=args.kv_link_gbs,
        )


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    d = DisaggConfig()
    group = parser.add_argument_group("disaggregation (--role prefill|decode)")
    group.add_argument(
        "--disagg-prefill-component", default=env_default("DYN_DISAGG_PREFILL_COMPONENT", d.prefill_component),
        help="component of the prefill workers; a prefill worker with the default --component "
        "serves here [env DYN_DISAGG_PREFILL_COMPONENT]",
    )
    group.add_argument(
        "--disagg-min-prefill-tokens", type=int,
        default=int(env_default("DYN_DISAGG_MIN_PREFILL_TOKENS", str(d.min_prefill_tokens)) or 0),
        help="decode workers prefill locally when fewer prompt tokens than this are uncached "
        "on them [env DYN_DISAGG_MIN_PREFILL_TOKENS]",
    )
    group.add_argument(
        "--disagg-max-prefill-queue", type=int,
        default=int(env_default("DYN_DISAGG_MAX_PREFILL_QUEUE", str(d.max_prefill_queue_tokens)) or 0),
        help="prompt tokens queued on the least busy prefill worker above which decode workers "
        "prefill locally [env DYN_DISAGG_MAX_PREFILL_QUEUE]",
    )
    group.add_argument(
        "--disagg-prefill-timeout-s", type=float,
        default=float(env_default("DYN_DISAGG_PREFILL_TIMEOUT_S", str(d.prefill_timeout_s)) or d.prefill_timeout_s),
        help="a remote prefill (with its KV transfer) slower than this is abandoned and the "
        "prompt prefilled locally [env DYN_DISAGG_PREFILL_TIMEOUT_S]",
    )
    group.add_argument(
        "--kv-transfer-backend", choices=TRANSFER_BACKEND_CHOICES,
        default=env_default("DYN_KV_TRANSFER_BACKEND", d.kv_transfer_backend),
        help="auto: a direct copy between workers of one process (same-process), CUDA IPC between "
        "GPUs of one host, NIXL when installed, host memory over TCP otherwise; vllm-nixl (--engine vllm on GPUs): vLLM's own NixlConnector instead of ours "
        "[env DYN_KV_TRANSFER_BACKEND]",
    )
    group.add_argument(
        "--kv-transfer-host", default=env_default("DYN_KV_TRANSFER_HOST", d.kv_transfer_host),
        help="address of this worker's KV transfer listener, as peers reach it (default: listen "
        "on every interface and advertise this host's address on its default route) "
        "[env DYN_KV_TRANSFER_HOST]",
    )
    group.add_argument(
        "--kv-link-gbs", type=float,
        default=float(env_default("DYN_KV_LINK_GBS", str(d.kv_link_gbs)) or d.kv_link_gbs),
        help="mocker only: bandwidth of the simulated KV link in GB/s [env DYN_KV_LINK_GBS]",
    )
