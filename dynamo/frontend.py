"""`python -m dynamo.frontend`: the user-facing name of frontend/cli.py."""

from frontend.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
