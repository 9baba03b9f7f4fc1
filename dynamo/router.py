"""`python -m dynamo.router`: the user-facing name of router/cli.py."""

from router.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
