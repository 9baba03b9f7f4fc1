"""The worker's command line (`python -m dynamo.worker`): the engine and model flags, the
worker's own flags, the chosen engine's flags, and `main`, which serves one engine as a worker
on the distributed runtime. `serve/cli.py` reuses the pieces for the one-process run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynamo.config import RuntimeConfig, add_runtime_args
from dynamo.entry import SYSTEM_FLAGS, add_common_args, run, wait_for_shutdown
from dynamo.flags import Flag, FlagGroup, positive_int
from dynamo.runtime import Runtime
from dynamo.system_server import SystemServer
from workers.disagg.args import DisaggConfig, add_disagg_args
from workers.embedding import EMBED_ENDPOINT, EMBEDDING_FLAGS, embedding_config
from workers.registry import DEFAULT_ENGINE, ENGINE_NAMES, engine_spec
from workers.worker import Worker, WorkerConfig

MODEL_FLAGS = FlagGroup(
    "model",
    [
        Flag(
            "--engine",
            "engine to serve (docs/engines.md); the chosen engine adds its own flags",
            default=DEFAULT_ENGINE,
            env="DYN_ENGINE",
            choices=ENGINE_NAMES,
        ),
        Flag(
            "--model",
            "local model directory (Hugging Face layout)",
            env="DYN_MODEL",
            default_doc="required (dynamo.serve: models/dynamo-tiny)",
        ),
        Flag(
            "--served-model-name",
            "model name clients ask for",
            env="DYN_SERVED_MODEL_NAME",
            default_doc="the model directory's name",
        ),
    ],
)

WORKER_FLAGS = FlagGroup(
    "worker",
    [
        Flag(
            "--role",
            "aggregated serves whole requests; prefill/decode split them (docs/disaggregation.md)",
            default="aggregated",
            env="DYN_ROLE",
            choices=("aggregated", "prefill", "decode"),
        ),
        Flag("--component", "component the worker serves under", default="backend", env="DYN_COMPONENT"),
        Flag("--endpoint", "endpoint the worker serves", default="generate", env="DYN_ENDPOINT"),
        # On by default, unlike NVIDIA Dynamo (0): a worker lost mid-stream should cost the
        # client a pause, not its answer; 3 bounds what one poisonous request can take down.
        # One meaning everywhere: the frontend's --migration-limit (frontend/config.py, same
        # env) is the same number, overriding the cards; dynamo.serve declares it once.
        Flag(
            "--migration-limit",
            "times a request may move to another worker if this one dies mid-stream (0: never); "
            "registered in the model card, a frontend's own --migration-limit overrides it",
            default=3,
            env="DYN_MIGRATION_LIMIT",
            type=int,
        ),
        Flag(
            "--graceful-shutdown-timeout-s",
            "on SIGTERM, how long in-flight requests may finish after the worker deregistered; "
            "those still running are then cancelled (and migrated by the frontend)",
            default=30.0,
            env="DYN_GRACEFUL_SHUTDOWN_TIMEOUT_S",
            type=float,
        ),
        # Read by the frontend from the model card (frontend/parsers): how this model writes
        # tool calls and reasoning. Unset: recognised from the model's chat template.
        Flag(
            "--dyn-tool-call-parser",
            "how the frontend reads tool calls from this model's output with tool_choice auto: "
            "hermes, llama3_json, mistral, pythonic, qwen3_coder",
            env="DYN_TOOL_CALL_PARSER",
            default_doc="recognised from the chat template",
        ),
        Flag(
            "--dyn-reasoning-parser",
            "how the frontend splits <think> reasoning from this model's answer into "
            "reasoning_content: deepseek_r1, qwen3",
            env="DYN_REASONING_PARSER",
            default_doc="recognised from the chat template",
        ),
        Flag(
            "--stream-interval",
            "after a request's first token, send its tokens in groups of at least this many (the "
            "last group may be smaller): fewer messages and SSE chunks per token, burstier "
            "inter-token latency; 1 sends each token as it comes",
            default=1,
            env="DYN_STREAM_INTERVAL",
            type=positive_int,
        ),
        Flag(
            "--max-queued-requests",
            "requests waiting for the engine before new ones are refused as overloaded, so the "
            "frontend tries another worker or answers 503 (0: unbounded)",
            default=1024,
            env="DYN_MAX_QUEUED_REQUESTS",
            type=int,
        ),
    ],
)


def default_model_dir() -> str:
    """The project's own small model, shipped in models/dynamo-tiny."""
    return str(Path(__file__).resolve().parent.parent / "models" / "dynamo-tiny")


def add_model_args(parser: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    MODEL_FLAGS.add_to(parser, defaults={"model": default_model})


def add_worker_args(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """The worker's flags and the prefill/decode roles' flags; `skip` leaves out flags an
    entry point declares itself (dynamo.serve: --migration-limit, which its frontend has)."""
    WORKER_FLAGS.add_to(parser, skip=skip)
    EMBEDDING_FLAGS.add_to(parser)
    add_disagg_args(parser)


def chosen_engine(argv: list[str]) -> str:
    """The first of two parsing passes: --engine (or DYN_ENGINE) decides which flags exist."""
    pre = argparse.ArgumentParser(add_help=False)
    MODEL_FLAGS.add_to(pre)
    return str(pre.parse_known_args(argv)[0].engine)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.worker", description="Serve an LLM engine as a worker."
    )
    add_common_args(parser)
    add_runtime_args(parser, default_backend="distributed")
    add_model_args(parser)
    add_worker_args(parser)
    SYSTEM_FLAGS.add_to(parser)
    engine_spec(chosen_engine(argv)).add_args(parser)
    return parser


def served_model_name(args: argparse.Namespace) -> str:
    return str(args.served_model_name or Path(args.model).resolve().name)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    component = args.component
    if args.role == "prefill" and component == "backend":
        # Prefill workers must not share the decode workers' component: the frontend routes
        # there, and decode workers watch the prefill component's KV events and load.
        component = args.disagg_prefill_component
    migration_limit = args.migration_limit
    if migration_limit is None:  # dynamo.serve with no --migration-limit: the worker's default
        migration_limit = WORKER_FLAGS["--migration-limit"].default
    embedding = embedding_config(args, args.model)
    endpoint = args.endpoint
    if embedding is not None and endpoint == WORKER_FLAGS["--endpoint"].default:
        endpoint = EMBED_ENDPOINT  # an embedding model serves its own endpoint, not generate
    if embedding is not None and args.role != "aggregated":
        raise SystemExit("an embedding model (--runner pooling) is served aggregated: --role must be aggregated")
    return WorkerConfig(
        served_model_name=served_model_name(args),
        model_path=args.model,
        engine_name=args.engine,
        component=component,
        disagg=DisaggConfig.from_args(args),
        endpoint=endpoint,
        role=args.role,
        migration_limit=migration_limit,
        max_queued_requests=args.max_queued_requests,
        stream_interval=args.stream_interval,
        tool_call_parser=args.dyn_tool_call_parser or "",
        reasoning_parser=args.dyn_reasoning_parser or "",
        embedding=embedding,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a local model directory; or set DYN_MODEL)")
    return args


async def serve_worker(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM, then drain."""
    async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
        engine = engine_spec(args.engine).create(args)
        async with Worker(runtime, engine, worker_config(args)) as worker:
            if args.system_port:
                async with SystemServer(args.system_host, args.system_port, worker.registry, worker.ready):
                    await wait_for_shutdown()
                    await worker.drain(args.graceful_shutdown_timeout_s)
            else:
                await wait_for_shutdown()
                await worker.drain(args.graceful_shutdown_timeout_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run(lambda: serve_worker(args), args)
