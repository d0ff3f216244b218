"""OpenAPI-driven fuzzing of every route: no 5xx, every response matching its schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("worker")


def test_schemathesis_finds_no_server_error_or_schema_violation(live_server: str,
                                                                 tmp_path: Path) -> None:
    cli = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [cli, "run", f"{live_server}/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--phases", "examples,fuzzing", "--max-examples", "60", "--seed", "20261126",
         "--report", "junit", "--report-junit-path", str(report)],
        capture_output=True, text=True, timeout=600)
    tail = result.stdout[-4000:]
    assert result.returncode == 0, tail
    generated = [line for line in result.stdout.splitlines() if "generated" in line]
    assert generated, tail
    count = int(generated[-1].split()[0])
    assert count >= 1000, tail
