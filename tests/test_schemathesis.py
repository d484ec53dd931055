"""Issue 20: schemathesis against the OpenAPI document a real daphne process serves. For
every operation it generates requests from the schema and checks each answer: no 5xx, a
documented status and content type, a body and headers that match the schema, and a
refusal of what the schema forbids. Bounded (15 examples per operation, about 10 s).

One check is left out: that every schema-valid request is accepted. The API refuses more
than OpenAPI can say (a NUL character in any text, a period whose since is after its
until); those refusals are the contract's 400s, and the schema is as tight as it can be.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks

from tests.cluster import Broker

pytestmark = pytest.mark.multiproc  # a daphne process of its own

# MCPD_SCHEMATHESIS_EXAMPLES=500 for a longer run (make soak).
EXAMPLES = int(os.environ.get("MCPD_SCHEMATHESIS_EXAMPLES", "15"))
EXCLUDED = [checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = Broker(1, services=False).start()
    yield b
    b.stop()


def test_every_operation_answers_as_its_schema_says(broker: Broker) -> None:
    raw = httpx.get(f"{broker.url(0)}/api/schema/?format=json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    # An admin token: every operation is reachable (publisher routes answer 403 to it,
    # which their schemas document), and nothing is refused for want of a role.
    headers = {"Authorization": f"Bearer {broker.token('admin')}"}
    failures: list[str] = []
    tried = [0]

    def runner(operation: Any) -> Any:
        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            tried[0] += 1
            case.call_and_validate(
                base_url=broker.url(0), headers=headers, excluded_checks=EXCLUDED
            )

        return run

    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err would raise here
        try:
            runner(operation)()
        except Exception as exc:  # one operation's failure; report them all at the end
            failures.append(f"{operation.label}: {exc}")
    print(f"schemathesis: {tried[0]} requests over {len(raw['paths'])} paths")
    assert not failures, "\n\n".join(failures) + "\n--- worker log ---\n" + broker.log(0)
    assert tried[0] >= len(raw["paths"])
    assert httpx.get(f"{broker.url(0)}/healthz").status_code == 200  # still serving
