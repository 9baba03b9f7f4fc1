"""The command lines: every entry point's parser builds for every engine that is installed (no
flag declared twice: there is no conflict_handler to hide a clash), builtin is the default
engine everywhere, and the dynamo/ entry modules are shims over the packages' own cli modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from workers.registry import DEFAULT_ENGINE, ENGINE_NAMES

ROOT = Path(__file__).resolve().parents[3]
ENTRY_POINTS = ("dynamo.frontend", "dynamo.worker", "dynamo.router", "dynamo.serve", "dynamo.planner")


def parser_for(module: str, engine: str | None):  # type: ignore[no-untyped-def]
    build = importlib.import_module(module).build_parser
    try:
        return build(["--engine", engine] if engine else [])
    except SystemExit as exc:  # an optional engine that is not installed here
        pytest.skip(f"{module} --engine {engine}: {exc}")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("module", ["dynamo.worker", "dynamo.serve"])
def test_engine_parsers_build_without_clashes(module: str, engine: str) -> None:
    parser = parser_for(module, engine)
    options = [o for a in parser._actions for o in a.option_strings]
    assert len(options) == len(set(options))
    assert parser.conflict_handler == "error"


@pytest.mark.parametrize("module", ["dynamo.frontend", "dynamo.router", "dynamo.planner"])
def test_other_parsers_build(module: str) -> None:
    parser = parser_for(module, None)
    assert parser.conflict_handler == "error"


def test_builtin_is_every_default_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_ENGINE", raising=False)
    assert DEFAULT_ENGINE == "builtin"
    for module in ("dynamo.worker", "dynamo.serve"):
        parser = importlib.import_module(module).build_parser([])
        args = parser.parse_args(["--model", "m"])
        assert args.engine == "builtin"
        assert "(default: builtin)" in " ".join(parser.format_help().split())


def test_one_migration_limit_in_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.cli import build_parser
    from workers.cli import worker_config

    monkeypatch.delenv("DYN_MIGRATION_LIMIT", raising=False)
    args = build_parser(["--engine", "mocker"]).parse_args(["--engine", "mocker"])
    assert args.migration_limit is None  # the frontend's: each card decides
    assert worker_config(args).migration_limit == 3  # the worker's default, in its card
    args = build_parser(["--engine", "mocker"]).parse_args(["--engine", "mocker", "--migration-limit", "0"])
    assert worker_config(args).migration_limit == 0


def test_stream_interval_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from serve.cli import build_parser
    from workers.cli import worker_config

    monkeypatch.delenv("DYN_STREAM_INTERVAL", raising=False)
    argv = ["--engine", "mocker"]
    assert worker_config(build_parser(argv).parse_args(argv)).stream_interval == 1
    assert worker_config(build_parser(argv).parse_args([*argv, "--stream-interval", "4"])).stream_interval == 4
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args([*argv, "--stream-interval", "0"])
    assert "invalid positive_int value: '0'" in capsys.readouterr().err
    monkeypatch.setenv("DYN_STREAM_INTERVAL", "3")
    assert worker_config(build_parser(argv).parse_args(argv)).stream_interval == 3
    monkeypatch.setenv("DYN_STREAM_INTERVAL", "0")
    with pytest.raises(SystemExit, match="must be at least 1"):
        build_parser(argv).parse_args(argv)


def test_worker_needs_a_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from workers.cli import parse_args

    monkeypatch.delenv("DYN_MODEL", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--engine", "mocker"])
    assert "--model is required" in capsys.readouterr().err


@pytest.mark.parametrize("module", ENTRY_POINTS + ("dynamo.cli",))
def test_entry_modules_import_nothing_lazily(module: str) -> None:
    """dynamo/'s entry modules: module-level imports only, and (but for dynamo.cli's dispatch)
    nothing but the package's cli."""
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not nested, f"{path.name}: function-local import in {node.name}"
    if module != "dynamo.cli":
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert len(imports) == 1 and isinstance(imports[0], ast.ImportFrom)
        assert imports[0].module is not None and imports[0].module.endswith(".cli")


def test_the_runtime_imports_no_package_above_it() -> None:
    """dynamo/ (but its entry shims) imports neither frontend, router, workers, kvbm, serve nor planner."""
    above = ("frontend", "router", "workers", "kvbm", "serve", "planner")
    shims = {f"{m.split('.')[1]}.py" for m in ENTRY_POINTS} | {"cli.py"}
    for path in (ROOT / "dynamo").rglob("*.py"):
        if path.parent == ROOT / "dynamo" and path.name in shims:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in above, f"{path.relative_to(ROOT)} imports {name}"


def test_router_imports_no_workers() -> None:
    for path in (ROOT / "router").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("workers", "frontend", "serve")), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("workers", "frontend", "serve")) for a in node.names), path


def test_planner_imports_only_the_runtime() -> None:
    """The planner talks to workers and frontends over the network, never through their code."""
    for path in (ROOT / "planner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("workers", "frontend", "serve", "router", "kvbm")), path


def test_worker_processes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.cli import build_parser, main

    from serve.cli import worker_processes

    def resolved(argv: list[str]) -> bool:
        return worker_processes(build_parser(argv).parse_args(argv))

    monkeypatch.delenv("DYN_WORKER_PROCESSES", raising=False)
    argv = ["--engine", "mocker"]
    assert build_parser(argv).parse_args(argv).worker_processes is None  # the engine decides
    assert resolved(argv) is False
    assert resolved([*argv, "--worker-processes"]) is True
    monkeypatch.setenv("DYN_WORKER_PROCESSES", "1")
    assert resolved(argv) is True
    assert resolved([*argv, "--no-worker-processes"]) is False
    monkeypatch.delenv("DYN_WORKER_PROCESSES")
    # The built-in engine on a GPU gets a process of its own unless told otherwise; on the CPU
    # (and "auto" on this machine, which has no CUDA) it stays in the frontend's process.
    torch = pytest.importorskip("torch")
    builtin = ["--engine", "builtin", "--device"]
    assert resolved([*builtin, "cuda"]) is True and resolved([*builtin, "cuda:1"]) is True
    assert resolved([*builtin, "cpu"]) is False
    assert resolved([*builtin, "cpu", "--prefill-device", "cuda"]) is True
    assert resolved([*builtin, "cuda", "--no-worker-processes"]) is False
    assert resolved([*builtin, "auto"]) is torch.cuda.is_available()
    assert resolved([*builtin, "cuda", "--runtime", "distributed"]) is False  # no hub to put children on
    # Children live on the parent's hub, which the distributed runtime does not have.
    with pytest.raises(SystemExit, match="embedded runtime"):
        main([*argv, "--worker-processes", "--runtime", "distributed"])
