"""`python -m dynamo.planner`: the user-facing name of planner/cli.py."""

from planner.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
