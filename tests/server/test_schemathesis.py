"""Schemathesis against the served OpenAPI schema (issue 15), in a short bounded form: a fixed
seed, a few examples per operation. No request may get a 5xx, and every status must be one
the schema lists (so the schema tells clients the truth)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import schemathesis
from loraplex.kernels import runtime
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.state import ServerState
from schemathesis.checks import not_a_server_error, status_code_conformance
from tests.factory import make_adapter, make_model

pytestmark = pytest.mark.filterwarnings("ignore")


def served_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzed")
    make_model(root / "base", "llama")
    roots = root / "adapters"
    make_adapter(root / "base", roots / "all", "all", seed=1)
    config = ServerConfig(model=str(root / "base"), served_model_name="tiny", dtype="fp32", device="cpu",
                          kv_cache_tokens=1024, max_num_seqs=8, adapters={"all": str(roots / "all")},
                          adapter_roots=[str(roots)], allow_unauthenticated_admin=True, max_tokens_limit=4,
                          max_n=2, engine_process=False)
    state = ServerState(config)
    with runtime.reference_kernels():
        state.start(background=False)
    torch.set_num_threads(1)
    return create_app(state, start=False), state


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, state = served_app(tmp_path_factory)
    with runtime.reference_kernels():
        yield app
    state.shutdown()


SERVED = ["tiny", "all"]  # the base model and the adapter: without them most cases end at a 404
_calls = [0]


def aim_at_served_models(case) -> None:
    """Two cases in three name a served model (the generated name otherwise), so that the
    completions really run with the fuzzed fields."""
    _calls[0] += 1
    if _calls[0] % 3 and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = SERVED[_calls[0] % 2]


def test_no_server_errors_and_only_documented_statuses(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the schema
    failures = []
    for operation in operations:
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            aim_at_served_models(case)
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        try:
            fuzz()
        except Exception as exc:  # every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
