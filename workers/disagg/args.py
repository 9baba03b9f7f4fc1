"""Flags of the prefill and decode roles (DYN_DISAGG_* / DYN_KV_TRANSFER_* fallbacks) and the
frozen DisaggConfig they become."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dynamo.flags import Flag, FlagGroup
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


_D = DisaggConfig()
DISAGG_FLAGS = FlagGroup(
    "disaggregation (--role prefill|decode)",
    [
        Flag("--disagg-prefill-component", "component of the prefill workers; a prefill worker with the default "
             "--component serves here", _D.prefill_component, "DYN_DISAGG_PREFILL_COMPONENT"),
        Flag("--disagg-min-prefill-tokens", "decode workers prefill locally when fewer prompt tokens than this are "
             "uncached on them", _D.min_prefill_tokens, "DYN_DISAGG_MIN_PREFILL_TOKENS", int),
        Flag("--disagg-max-prefill-queue", "prompt tokens queued on the least busy prefill worker above which "
             "decode workers prefill locally", _D.max_prefill_queue_tokens, "DYN_DISAGG_MAX_PREFILL_QUEUE", int),
        Flag("--disagg-prefill-timeout-s", "a remote prefill (with its KV transfer) slower than this is abandoned "
             "and the prompt prefilled locally", _D.prefill_timeout_s, "DYN_DISAGG_PREFILL_TIMEOUT_S", float),
        Flag("--kv-transfer-backend", "auto: a direct copy between workers of one process (same-process), CUDA IPC "
             "between GPUs of one host, NIXL when installed, host memory over TCP otherwise; vllm-nixl "
             "(--engine vllm on GPUs): vLLM's own NixlConnector instead of ours", _D.kv_transfer_backend,
             "DYN_KV_TRANSFER_BACKEND", choices=TRANSFER_BACKEND_CHOICES),
        Flag("--kv-transfer-host", "address of this worker's KV transfer listener, as peers reach it", None,
             "DYN_KV_TRANSFER_HOST",
             default_doc="listen on every interface and advertise this host's address on its default route"),
        Flag("--kv-link-gbs", "mocker only: bandwidth of the simulated KV link in GB/s", _D.kv_link_gbs,
             "DYN_KV_LINK_GBS", float),
    ],
)


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    DISAGG_FLAGS.add_to(parser)
