"""Fuzz the API from its own OpenAPI schema (schemathesis + hypothesis): valid and invalid inputs,
never a 5xx, responses as documented. Runs the real engine with a short context so generations stay
short."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import API_KEY, ServerThread, make_app

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (content_type_conformance, not_a_server_error,  # noqa: E402
                                 response_schema_conformance)

EXAMPLES = {"POST /v1/chat/completions": 40, "POST /v1/completions": 30}
DEFAULT_EXAMPLES = 10


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    app, _ = make_app(model_dir, engine_kwargs={"max_model_len": 256}, api_key=API_KEY, max_default_tokens=8)
    with ServerThread(app) as srv:
        yield srv


# bad requests stay in the default suite; schema-valid ones (covered by the endpoint tests) run with -m slow
@pytest.mark.parametrize("mode", [pytest.param(GenerationMode.POSITIVE, marks=pytest.mark.slow), GenerationMode.NEGATIVE])
def test_schema_fuzz_no_server_errors(fuzz_server, mode):
    raw = httpx.get(fuzz_server.url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    failures, ran, statuses = [], [], {}
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"  # run() below is called within this iteration
        n = EXAMPLES.get(label, DEFAULT_EXAMPLES) // (2 if mode == GenerationMode.NEGATIVE else 1)

        @hypothesis.settings(max_examples=n, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            try:
                r = case.call_and_validate(base_url=fuzz_server.url, headers=headers, timeout=60,
                                           checks=[not_a_server_error, content_type_conformance,
                                                   response_schema_conformance])
                statuses[(label, r.status_code)] = statuses.get((label, r.status_code), 0) + 1
            except Exception as e:  # collect, report all operations at once
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:600]}")

        try:
            run()
            ran.append(label)
        except hypothesis.errors.Unsatisfiable:  # nothing invalid to send (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, label
    assert "POST /v1/chat/completions" in ran and "POST /v1/completions" in ran
    if mode == GenerationMode.POSITIVE:  # the fuzzer must reach the engine, not only the validators
        assert statuses.get(("POST /v1/chat/completions", 200), 0) >= 5, statuses
    assert not failures, "\n\n".join(failures[:5])
    assert time.monotonic() - t0 < 120
