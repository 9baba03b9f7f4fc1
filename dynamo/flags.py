"""Command-line flags declared once: a `Flag` names its flag, its environment variable, its
default, its type and its help, and from that one declaration come the argparse argument, the
environment fallback, the help text (default and variable appended) and the docs' flag table.

Precedence: the command line, then the environment variable, then the entry point's own
default (`FlagGroup.add_to(defaults=...)`), then the declared default. The environment is read
here, when a parser is built by an entry point, never by library code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """`1/true/yes/on` or `0/false/no/off` (any case), as environment variables spell booleans."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse names this function in its error: "invalid
    positive_int value")."""
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Flag:
    """One flag. `type` parses the command line's and the environment's text (`bool` makes a
    `--x/--no-x` switch); `default_doc` is how help and docs show a default computed at run
    time (e.g. "this host's default-route address"), in place of `default`."""

    name: str
    help: str
    default: Any = None
    env: str | None = None
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    default_doc: str | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def shown_default(self, entry_default: Any = None) -> str | None:
        """The default as help and docs show it (an entry point's own default when it has
        one, else `default_doc`, else `default`); None when there is nothing to show."""
        value = self.default
        if entry_default is not None and entry_default != self.default:
            value = entry_default
        elif self.default_doc is not None:
            return self.default_doc
        if value is None:
            return None
        if self.type is bool:
            return "on" if value else "off"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    def from_env(self, environ: Mapping[str, str]) -> Any:
        """The environment's value, parsed; None when the variable is unset or empty."""
        if self.env is None:
            return None
        text = environ.get(self.env)
        if text is None or text == "":
            return None
        parse = parse_bool if self.type is bool else self.type
        try:
            value = parse(text)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"environment variable {self.env}={text!r} is not valid for {self.name}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise SystemExit(
                f"environment variable {self.env}={text!r} is not one of {', '.join(self.choices)} ({self.name})"
            )
        return value


class FlagGroup:
    """The flags of one concern (runtime, router, worker...), added to a parser as one
    argument group and rendered as one markdown table."""

    def __init__(self, title: str, flags: list[Flag]) -> None:
        self.title = title
        self.flags = tuple(flags)
        names = [f.name for f in self.flags]
        if len(set(names)) != len(names):
            raise ValueError(f"flag group {title!r} declares a flag twice")

    def __iter__(self) -> Iterator[Flag]:
        return iter(self.flags)

    def __getitem__(self, name: str) -> Flag:
        for flag in self.flags:
            if flag.name == name:
                return flag
        raise KeyError(name)

    def add_to(
        self,
        parser: argparse.ArgumentParser,
        *,
        defaults: Mapping[str, Any] | None = None,
        skip: tuple[str, ...] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Add every flag but those in `skip` (by name); `defaults` (by dest) overrides
        declared defaults for this entry point, below the environment."""
        environ = os.environ if environ is None else environ
        defaults = defaults or {}
        group = parser.add_argument_group(self.title)
        for flag in self.flags:
            if flag.name in skip:
                continue
            entry_default = defaults.get(flag.dest, flag.default)
            env_value = flag.from_env(environ)
            default = entry_default if env_value is None else env_value
            help_text = flag.help
            shown = flag.shown_default(entry_default)
            if shown is not None:
                help_text += f" (default: {shown})"
            if flag.env:
                help_text += f" [env {flag.env}]"
            help_text = help_text.replace("%", "%%")
            if flag.type is bool:
                group.add_argument(
                    flag.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            else:
                group.add_argument(
                    flag.name,
                    type=flag.type,
                    default=default,
                    choices=flag.choices,
                    metavar=flag.metavar,
                    help=help_text,
                )

    def markdown_table(self) -> str:
        """The docs' table for this group: flag, environment variable, default, meaning."""
        rows = ["| flag | env | default | meaning |", "| --- | --- | --- | --- |"]
        for flag in self.flags:
            name = f"`{flag.name}`" if flag.type is not bool else f"`{flag.name}` / `--no-{flag.name[2:]}`"
            if flag.choices:
                name += " (" + ", ".join(f"`{c}`" for c in flag.choices) + ")"
            env = f"`{flag.env}`" if flag.env else ""
            shown = flag.shown_default()
            default = "" if shown is None else (shown if flag.default_doc else f"`{shown}`")
            rows.append(f"| {name} | {env} | {default} | {_cell(flag.help)} |")
        return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


FLAG_TABLE_START = "<!-- flags: {name} -->"
FLAG_TABLE_END = "<!-- /flags -->"


def replace_flag_table(markdown: str, name: str, table: str) -> str:
    """`markdown` with the block between `<!-- flags: name -->` and `<!-- /flags -->` replaced
    by `table` (the docs' tables are generated; tests/unit/dynamo/test_flags.py checks them)."""
    start_marker = FLAG_TABLE_START.format(name=name)
    start = markdown.index(start_marker) + len(start_marker)
    end = markdown.index(FLAG_TABLE_END, start)
    return markdown[:start] + "\n" + table + "\n" + markdown[end:]


def flag_table_in(markdown: str, name: str) -> str | None:
    """The table between the markers for `name`, or None when the page has none."""
    start_marker = FLAG_TABLE_START.format(name=name)
    if start_marker not in markdown:
        return None
    start = markdown.index(start_marker) + len(start_marker)
    end = markdown.index(FLAG_TABLE_END, start)
    return markdown[start:end].strip("\n")
