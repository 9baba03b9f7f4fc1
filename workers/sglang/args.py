"""The SGLang worker's flags: SGLang's own server flags (ServerArgs.add_cli_args), passed through
unchanged, plus a few of ours; and the SglangConfig they turn into. Nothing here imports SGLang at
module import time: only building the parser and the engine does."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from dynamo.flags import Flag, FlagGroup

SGLANG_VERSION = "0.5.23"
INSTALL_HINT = (
    f"--engine sglang needs SGLang: `pip install sglang=={SGLANG_VERSION}` into this virtualenv "
    "(it needs an NVIDIA GPU with CUDA 13 and torch 2.14.1)"
)

# The entry point owns these and means the same by them. SGLang spells the model
# `--model-path` (alias `--model`); we map our --model onto it.
OWNED_BY_ENTRY_POINT = ("--model", "--model-path", "--served-model-name", "--log-level", "-h", "--help")
# Forced so the worker sends token ids and gets token ids back: the frontend tokenizes,
# detokenizes and applies stop strings. --sglang-structured-outputs lifts it: SGLang builds its
# grammar backend only with its tokenizer loaded (it then also detokenizes, unused by us).
FORCED_SERVER_ARGS: dict[str, Any] = {"skip_tokenizer_init": True}


@dataclass(frozen=True, slots=True)
class SglangConfig:
    """server_kwargs are ServerArgs field values exactly as the user's SGLang flags set them
    (defaults included), plus model_path/served_model_name and FORCED_SERVER_ARGS."""

    server_kwargs: dict[str, Any] = field(default_factory=dict)
    publish_kv_events: bool = True
    load_poll_s: float = 0.25

    @property
    def grammar_available(self) -> bool:
        """Whether SGLang will build a grammar backend (it does not without its tokenizer)."""
        kwargs = self.server_kwargs
        return not kwargs.get("skip_tokenizer_init") and kwargs.get("grammar_backend") != "none"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SglangConfig:
        dests = getattr(args, "_sglang_dests", ())
        return cls(
            server_kwargs=server_kwargs_from_namespace(args, dests, args.sglang_structured_outputs),
            publish_kv_events=args.publish_kv_events,
            load_poll_s=args.sglang_load_poll_s,
        )

    @classmethod
    def for_model(
        cls, model: str, publish_kv_events: bool = True, structured_outputs: bool = False, **server_kwargs: Any
    ) -> SglangConfig:
        """For code and tests: ServerArgs(model_path=model, **server_kwargs)."""
        return cls({"model_path": model, **server_kwargs, **forced_server_args(structured_outputs)}, publish_kv_events)

    def with_server_args(self, **changes: Any) -> SglangConfig:
        return replace(self, server_kwargs={**self.server_kwargs, **changes})


def forced_server_args(structured_outputs: bool = False) -> dict[str, Any]:
    return {**FORCED_SERVER_ARGS, "skip_tokenizer_init": not structured_outputs}


def server_kwargs_from_namespace(
    args: argparse.Namespace, dests: Iterable[str], structured_outputs: bool = False
) -> dict[str, Any]:
    """The SGLang dests' values, our --model as model_path, our served name if set.

    Only flags SGLang itself defines are passed (our own flags never reach ServerArgs), and
    their values are passed as argparse produced them, defaults included, as SGLang's own
    ServerArgs.from_cli_args does.
    """
    kwargs = {dest: getattr(args, dest) for dest in dests if hasattr(args, dest)}
    kwargs["model_path"] = args.model
    if getattr(args, "served_model_name", None):
        kwargs["served_model_name"] = args.served_model_name
    kwargs.update(forced_server_args(structured_outputs))
    return kwargs


def sglang_server_parser() -> argparse.ArgumentParser:
    """SGLang's own parser with its server flags (importing SGLang takes seconds)."""
    try:
        from sglang.srt.server_args import ServerArgs
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})") from None
    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def copy_foreign_actions(
    parser: argparse.ArgumentParser,
    foreign: argparse.ArgumentParser,
    title: str,
    description: str,
    skip: Iterable[str] = OWNED_BY_ENTRY_POINT,
) -> list[str]:
    """Adds every optional action of `foreign` that `parser` (and `skip`) do not already spell,
    as the same argparse Action object (names, types, defaults, choices, help), so the
    engine's own command line works as it is. Returns the dests added."""
    group = parser.add_argument_group(title, description)
    taken = set(parser._option_string_actions) | set(skip)  # argparse keeps no public view
    dests: list[str] = []
    for action in foreign._actions:
        if not action.option_strings or any(opt in taken for opt in action.option_strings):
            continue
        group._add_action(action)
        taken.update(action.option_strings)
        if action.dest not in dests:
            dests.append(action.dest)
    return dests


SGLANG_FLAGS = FlagGroup(
    "sglang worker",
    [
        Flag("--publish-kv-events", "subscribe to SGLang's KV events and publish them, re-hashed, for KV-aware "
             "routing", True, "DYN_SGLANG_PUBLISH_KV_EVENTS", bool),
        Flag("--sglang-load-poll-s", "how often to read SGLang's load snapshot for load metrics", 0.25,
             "DYN_SGLANG_LOAD_POLL_S", float),
        Flag("--sglang-structured-outputs", "load SGLang's tokenizer (no skip_tokenizer_init) so that its grammar "
             "backend serves response_format, regex, choice and grammar constraints; SGLang then also "
             "detokenizes every output, which costs CPU per token. Off: constrained requests are refused",
             False, "DYN_SGLANG_STRUCTURED_OUTPUTS", bool),
    ],
)


def add_sglang_args(parser: argparse.ArgumentParser, foreign: argparse.ArgumentParser | None = None) -> None:
    """Our SGLang-worker flags, then SGLang's server flags (from `foreign`, default: SGLang's)."""
    SGLANG_FLAGS.add_to(parser)
    dests = copy_foreign_actions(
        parser,
        foreign if foreign is not None else sglang_server_parser(),
        "sglang server",
        "SGLang's own server flags (ServerArgs), passed through unchanged",
    )
    # The namespace remembers which dests are SGLang's, so only those reach ServerArgs.
    parser.set_defaults(_sglang_dests=tuple(dests))
