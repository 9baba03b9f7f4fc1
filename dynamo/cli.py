"""The `dynamo` console script: `dynamo serve|frontend|worker|router ...`, each the same as
`python -m dynamo.<subcommand>`."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": "dynamo.serve",
    "frontend": "dynamo.frontend",
    "worker": "dynamo.worker",
    "router": "dynamo.router",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: dynamo {" + ",".join(SUBCOMMANDS) + "} [flags]   (see dynamo <cmd> --help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
