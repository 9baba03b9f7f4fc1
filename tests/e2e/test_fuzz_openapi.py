"""Schemathesis against the frontend's /openapi.json on a live `python -m dynamo.serve` (mocker,
no sleeping): every generated request must get a non-5xx answer.

The CI run is small (40 examples per operation, 13 operations: every API's routes, ~25 s);
DYN_FUZZ_EXAMPLES=1000 is the heavy run that docs/reliability.md reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, wait_ready

pytestmark = [pytest.mark.e2e]

MAX_EXAMPLES = int(os.environ.get("DYN_FUZZ_EXAMPLES", "40"))
# CPython before 3.11.8 / 3.12.1 can raise "SystemError: AST constructor recursion depth
# mismatch" when threads call ast.parse at once (gh-106905), which hypothesis does while
# describing strategies: schemathesis's worker threads then crash the tool, not the server.
_THREADSAFE_AST = (3, 11, 8) <= sys.version_info < (3, 12) or sys.version_info >= (3, 12, 1)
WORKERS = "4" if _THREADSAFE_AST else "1"


def test_openapi_fuzzing_gets_no_server_errors(tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    stack = Stack(tmp_path, base_env())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = stack.start(
        "serve", "dynamo.serve", "--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", "tiny",
        "--speedup-ratio", "1e7", "--http-host", "127.0.0.1", "--http-port", str(port),
    )
    try:
        wait_ready(server, base, 60)
        result = subprocess.run(
            [str(st), "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", str(MAX_EXAMPLES), "--workers", WORKERS, "--seed", "7",
             # Generous: on a loaded CI machine a long generated prompt may take seconds.
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=600,
        )
    finally:
        stack.stop_all()
    output = result.stdout + result.stderr
    cases = re.search(r"(\d+) generated", output)
    print(f"\nschemathesis: {cases.group(0) if cases else '?'} ({MAX_EXAMPLES} max examples per operation)")
    assert result.returncode == 0, output[-6000:]
    assert cases is not None and int(cases.group(1)) > 0, output[-2000:]
    assert "Traceback" not in server.log(), server.log()
