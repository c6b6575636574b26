"""`/admin/*` under the same contract suite as every route, with an admin token, on a
chatd of its own (the callers the fuzzer makes would guard the other routes' `/v1`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess
from tests.test_fuzz import EXAMPLES, config, fuzz_schema

ADMIN = "adm-fuzz-operator-31d7"
ADMIN_ERROR_TYPES = {
    400: {"invalid_request"},
    401: {"unauthorized"},
    403: {"forbidden"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    409: {"caller_exists", "config_caller", "no_database"},
    503: {"database_unavailable"},
}
# Seven operations on one small store: a third of the main run's examples each is plenty.
ADMIN_EXAMPLES = max(30, EXAMPLES // 3)
SENT: list[int] = []
admin_routes = fuzz_schema().exclude(path_regex="^/(?!admin/)")  # include() ORs with the config's


@pytest.fixture(scope="module")
def chatd(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[ChatdProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-admin")
    toml = config(fake.url + "/v1").replace(
        "[chatd]\n", '[chatd]\nadmin_token_env = "CHATD_FUZZ_ADMIN"\n', 1
    )
    with ChatdProcess(toml, tmp, env={"CHATD_FUZZ_ADMIN": ADMIN}) as process:
        yield process
        assert "Traceback" not in process.log(), process.log()[-3000:]


@admin_routes.parametrize()
@settings(
    max_examples=ADMIN_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
    print_blob=True,
)  # fmt: skip
def test_admin_routes_pass_every_contract_check(case: Any, chatd: ChatdProcess) -> None:
    response = case.call_and_validate(
        base_url=chatd.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    SENT.append(response.status_code)
    assert response.status_code != 500, response.text[:500]
    body = orjson.loads(response.content)
    if response.status_code >= 400:
        error = body["error"]
        assert error["type"] in ADMIN_ERROR_TYPES.get(response.status_code, set()), error
        positive = case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
        if positive and response.status_code == 400:  # the one rule JSON Schema cannot say
            assert error["param"] == "expires_at", (error, case.body)


def test_admin_fuzz_volume_is_reported() -> None:
    print(f"\nadmin fuzz: {len(SENT)} generated requests, statuses {sorted(set(SENT))}")
    assert len(SENT) >= ADMIN_EXAMPLES
    assert 201 in SENT and 200 in SENT  # it got past the token
