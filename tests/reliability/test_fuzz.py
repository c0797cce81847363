"""schemathesis against the live server's own /openapi.json: generated bodies that follow the
schema and bodies that break it, on every operation. No case may get a 5xx or an answer the
document does not describe (status, content type, response schema), and the server must be
healthy and idle afterwards.

`PAGODA_FUZZ_CASES` sets the number of cases (default 400; the target run uses 1,000)."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.metrics import wait_idle  # noqa: E402
from tests.server import RemoteServer  # noqa: E402

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_fuzzed_requests_get_no_server_error_and_match_the_document(tmp_path: Path) -> None:
    total = int(os.environ.get("PAGODA_FUZZ_CASES", "400"))
    log = tmp_path / "server.log"
    # A short context keeps every generated request cheap (max_tokens defaults to what is left).
    server = RemoteServer(["--max-model-len", "64", "--max-num-seqs", "8"], log_path=log)
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        with_body = [op for op in operations if op.body]
        assert {op.path for op in with_body} >= {
            "/v1/completions",
            "/v1/chat/completions",
            "/tokenize",
            "/detokenize",
        }
        statuses: collections.Counter[tuple[str, str, int]] = collections.Counter()
        failures: list[str] = []
        per_run = max(1, total // (2 * len(with_body)))

        def fuzz(operation: Any, mode: GenerationMode, examples: int) -> None:
            @given(operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def run(case: Any) -> None:
                response = case.call(base_url=server.url, timeout=120)
                statuses[(operation.label, mode.value, response.status_code)] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # noqa: BLE001 - collected, reported together below
                    body = str(case.body)[:300]
                    failures.append(f"{operation.label} {response.status_code} {body}: {exc}")

            run()

        for operation in with_body:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode, per_run)
        for operation in operations:
            if not operation.body:
                fuzz(operation, GenerationMode.POSITIVE, 1)

        cases = sum(statuses.values())
        print(f"{cases} cases:", dict(sorted(statuses.items())))
        assert not failures, "\n".join(failures[:10])
        assert cases >= min(total, 300)
        assert not any(status >= 500 for _, _, status in statuses)
        # Generated requests that follow the schema are served, not only refused.
        assert statuses[("POST /v1/completions", "positive", 200)] > 0
        assert statuses[("POST /v1/chat/completions", "positive", 200)] > 0
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert wait_idle(server.url) == (0, 0, 0)
    finally:
        assert server.stop() == 0, server.log_tail()
    assert "Traceback" not in log.read_text(errors="replace")


def test_streamed_responses_match_the_documented_events() -> None:
    """Every server-sent event of a streamed completion and chat completion validates against
    the document (schemathesis checks each event's fields; random generation need not draw a
    streamed request, so these two are sent every run)."""
    server = RemoteServer(["--max-model-len", "64", "--max-num-seqs", "8"])
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = {result.ok().path: result.ok() for result in schema.get_all_operations()}
        bodies = {
            "/v1/completions": {"prompt": "Hello", "max_tokens": 4, "stream": True},
            "/v1/chat/completions": {
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
                "stream": True,
            },
        }
        for path, body in bodies.items():
            case = operations[path].Case(body=body)
            response = case.call(base_url=server.url, timeout=120)
            assert response.status_code == 200
            assert response.headers["content-type"][0].startswith("text/event-stream")
            assert response.text.rstrip().endswith("data: [DONE]")
            case.validate_response(response, checks=CHECKS)
    finally:
        server.stop()
