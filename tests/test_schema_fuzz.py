"""schemathesis against the server's own /openapi.json: positive and negative cases (bounded
examples, the served model's id put in so requests reach the model): no server error, every
status and body as documented, and every input the schema calls invalid is refused."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)

import tiny
from server_helpers import ServerThread, bayesianized

EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny.make_llama(root / "base")
    post = bayesianized(base, tiny.make_lora(base, root / "lora"), root / "post", sigma=0.5)
    with ServerThread(model=str(base), adapter=post, samples=2, max_samples=4, max_items=4,
                      max_choices=8, max_kv_rows=64, request_timeout=30) as s:
        yield s


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_schema_holds_for_generated_requests(srv, mode):
    model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    tried = 0
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(op.as_strategy(generation_mode=mode))
        def check(case):
            nonlocal tried
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # so that generation requests reach the model
            response = case.call(base_url=srv.url, timeout=60)
            # a generated body over --max-body-bytes is refused (413) before it is parsed: also a
            # rejection, which schemathesis's default list of rejection statuses lacks
            here = [c for c in checks if not (response.status_code == 413 and c is negative_data_rejection)]
            case.validate_response(response, checks=here)
            tried += 1

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET"
    print(f"{mode.value}: {tried} requests")
    assert tried >= EXAMPLES
