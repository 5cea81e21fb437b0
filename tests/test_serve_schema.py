"""Schemathesis over the server's OpenAPI schema: generated valid and invalid requests never get a 5xx, and every
4xx is an OpenAI-shaped error. Small server limits keep each generated generation cheap."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from test_serve import NAME, tiny_checkpoint

from dgemma.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    model = tiny_checkpoint(tmp_path_factory.mktemp("schema") / NAME)
    app = create_app(model, ServeConfig(model_name=NAME, max_tokens=8, max_steps=2, max_batch=4))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check(case) -> None:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = NAME  # reach past the model check into the generation paths
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/infill", "/v1/edit"}
    for operation in operations:
        post = operation.method.upper() == "POST"
        if mode == schemathesis.GenerationMode.NEGATIVE and not post:
            continue  # a GET's only input is a path string: nothing to make invalid
        run = given(case=operation.as_strategy(mode))(check)
        settings(max_examples=15 if post else 3, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))(run)()
