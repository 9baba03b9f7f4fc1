"""The `dynamo` console script: `dynamo serve|frontend|worker|router|planner ...`, each the same as
`python -m dynamo.<subcommand>`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from frontend.cli import main as frontend_main
from planner.cli import main as planner_main
from router.cli import main as router_main
from serve.cli import main as serve_main
from workers.cli import main as worker_main

SUBCOMMANDS: dict[str, Callable[[list[str] | None], None]] = {
    "serve": serve_main,
    "frontend": frontend_main,
    "worker": worker_main,
    "router": router_main,
    "planner": planner_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: dynamo {" + ",".join(SUBCOMMANDS) + "} [flags]   (see dynamo <cmd> --help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
