"""`python -m dynamo.worker`: the user-facing name of workers/cli.py."""

from workers.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
