"""dynamo/flags.py: one declaration gives the flag, its environment fallback, its help and the
docs' table; and the docs' flag tables are the rendered ones.

`DYN_UPDATE_FLAG_TABLES=1 python -m pytest tests/unit/dynamo/test_flags.py` rewrites the tables
in the docs from the declarations."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from dynamo.flags import Flag, FlagGroup, flag_table_in, parse_bool, replace_flag_table

ROOT = Path(__file__).resolve().parents[3]


def tables() -> dict[str, FlagGroup]:
    """Table name in the docs (`<!-- flags: NAME -->`) -> the declarations it is rendered from.
    Imported here, not at collection: importing the real `frontend` package before pytest
    collects tests/unit/frontend (a package of that name) would shadow it."""
    from dynamo.config import RUNTIME_FLAGS, RUNTIME_SECURITY_FLAGS
    from dynamo.entry import LOGGING_FLAGS, SYSTEM_FLAGS
    from dynamo.tracing import TRACING_FLAGS
    from frontend.config import FRONTEND_FLAGS
    from planner.config import PLANNER_FLAGS
    from router.args import ROUTER_FLAGS
    from router.cli import SERVICE_FLAGS
    from serve.cli import SERVE_FLAGS
    from workers.cli import MODEL_FLAGS, WORKER_FLAGS
    from kvbm.config import KVBM_FLAGS
    from workers.builtin.args import BUILTIN_FLAGS
    from workers.disagg.args import DISAGG_FLAGS
    from workers.vllm.args import VLLM_FLAGS
    from workers.mocker.args import MOCKER_FLAGS
    from workers.sglang.args import SGLANG_FLAGS
    from workers.trtllm.args import TRTLLM_FLAGS

    return {
        "runtime": RUNTIME_FLAGS,
        "runtime-security": RUNTIME_SECURITY_FLAGS,
        "logging": LOGGING_FLAGS,
        "tracing": TRACING_FLAGS,
        "frontend": FRONTEND_FLAGS,
        "system": SYSTEM_FLAGS,
        "model": MODEL_FLAGS,
        "worker": WORKER_FLAGS,
        "serve": SERVE_FLAGS,
        "router": ROUTER_FLAGS,
        "router-service": SERVICE_FLAGS,
        "planner": PLANNER_FLAGS,
        "mocker": MOCKER_FLAGS,
        "kvbm": KVBM_FLAGS,
        "builtin": BUILTIN_FLAGS,
        "disagg": DISAGG_FLAGS,
        "vllm": VLLM_FLAGS,
        "sglang": SGLANG_FLAGS,
        "trtllm": TRTLLM_FLAGS,
    }


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_docs_flag_tables_are_the_rendered_ones() -> None:
    update = os.environ.get("DYN_UPDATE_FLAG_TABLES") == "1"
    TABLES = tables()
    found: dict[str, list[Path]] = {}
    for page in doc_pages():
        text = page.read_text()
        for name in re.findall(r"<!-- flags: ([a-z-]+) -->", text):
            assert name in TABLES, f"{page}: unknown flag table {name!r} (known: {sorted(TABLES)})"
            found.setdefault(name, []).append(page)
            rendered = TABLES[name].markdown_table()
            if update:
                text = replace_flag_table(text, name, rendered)
                page.write_text(text)
            else:
                assert flag_table_in(text, name) == rendered, (
                    f"{page.relative_to(ROOT)}: the {name!r} flag table differs from the declarations; "
                    "DYN_UPDATE_FLAG_TABLES=1 python -m pytest tests/unit/dynamo/test_flags.py rewrites it"
                )
    missing = sorted(set(TABLES) - set(found))
    assert not missing, f"flag tables in no doc page: {missing}"
    twice = {name: pages for name, pages in found.items() if len(pages) > 1}
    assert not twice, f"flag tables on several pages: {twice}"


GROUP = FlagGroup(
    "test",
    [
        Flag("--size", "a size", default=3, env="TEST_SIZE", type=int),
        Flag("--mode", "a mode", default="a", env="TEST_MODE", choices=("a", "b")),
        Flag("--on", "a switch", default=True, env="TEST_ON", type=bool),
        Flag("--name", "no default", env="TEST_NAME", default_doc="computed at run time"),
    ],
)


def parse(argv: list[str], environ: dict[str, str], defaults: dict[str, object] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    GROUP.add_to(parser, environ=environ, defaults=defaults)
    return parser.parse_args(argv)


def test_precedence_command_line_then_env_then_entry_default_then_declared() -> None:
    assert parse([], {}).size == 3
    assert parse([], {}, {"size": 5}).size == 5
    assert parse([], {"TEST_SIZE": "7"}, {"size": 5}).size == 7
    assert parse(["--size", "9"], {"TEST_SIZE": "7"}).size == 9
    assert parse([], {"TEST_SIZE": ""}).size == 3  # an empty variable is unset


def test_booleans_and_choices_from_the_environment() -> None:
    assert parse([], {}).on is True
    assert parse([], {"TEST_ON": "false"}).on is False
    assert parse(["--on"], {"TEST_ON": "0"}).on is True
    assert parse(["--no-on"], {}).on is False
    assert parse([], {"TEST_MODE": "b"}).mode == "b"
    with pytest.raises(SystemExit, match="TEST_MODE"):
        parse([], {"TEST_MODE": "c"})
    with pytest.raises(SystemExit, match="TEST_SIZE"):
        parse([], {"TEST_SIZE": "many"})
    with pytest.raises(SystemExit, match="TEST_ON"):
        parse([], {"TEST_ON": "maybe"})
    assert parse_bool("Yes") is True and parse_bool("OFF") is False


def test_help_shows_the_default_and_the_variable() -> None:
    parser = argparse.ArgumentParser()
    GROUP.add_to(parser, environ={}, defaults={"size": 5})
    text = " ".join(parser.format_help().split())
    assert "a size (default: 5) [env TEST_SIZE]" in text
    assert "a switch (default: on) [env TEST_ON]" in text
    assert "no default (default: computed at run time) [env TEST_NAME]" in text


def test_a_group_declares_each_flag_once() -> None:
    with pytest.raises(ValueError):
        FlagGroup("twice", [Flag("--x", "x"), Flag("--x", "again")])
