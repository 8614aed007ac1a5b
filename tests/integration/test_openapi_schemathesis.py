"""Schemathesis against a live manager (in this process, on the real livekit-server): requests
generated from `GET /openapi.json` for every operation, positive and negative; no answer may be
a 5xx, and every answer must conform to the document (status, content type, headers, body)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from session_manager.api.openapi import OPENAPI_PATH, OPERATIONS
from tests.conftest import ManagerFactory

pytestmark = pytest.mark.integration

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    )
)
MAX_EXAMPLES = 15  # per operation and phase: the whole run stays well under a minute
RUN_TIMEOUT = 150.0


@pytest.mark.timeout(RUN_TIMEOUT + 30)
async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    # Short deadlines: schemathesis reuses the ids it has seen, so it reads the event stream of
    # live sessions, which ends with the session; a session whose user never joins ends after
    # `client_join_timeout`, one whose services never join after `join_timeout`.
    manager: Any = await start_manager(join_timeout=3.0, client_join_timeout=5.0)
    base = str(manager.make_url("")).rstrip("/")
    st = Path(sys.executable).with_name("st")
    junit = tmp_path / "junit.xml"
    process = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "12",
        # One worker: hypothesis parses lambdas' source with `ast`, which is not thread-safe on
        # CPython 3.11 ("AST constructor recursion depth mismatch" with several workers).
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    # Every operation of the document was exercised, and none failed or erred.
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    tested = {case.get("name"): [child.tag for child in case] for case in cases}
    documented = {f"{op.method} {op.path}" for op in OPERATIONS}
    # Schemathesis leaves out the operation that serves the document it was loaded from (the
    # unit tests check that answer).
    assert set(tested) == documented - {f"GET {OPENAPI_PATH}"}, tested
    assert not any(outcomes for outcomes in tested.values()), tested
