"""`python -m dynamo.serve`: the user-facing name of serve/cli.py (everything in one process)."""

from serve.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
