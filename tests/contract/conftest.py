"""The contract suite runs on every store: the in-process one and each database engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.conftest import ENGINES, IN_PROCESS
from tests.services import in_ci


@pytest.fixture(params=[*IN_PROCESS, *ENGINES])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each store Conveyor supports; absent database servers skip (fail under CI=true)."""
    name: str = request.param
    if name in IN_PROCESS:
        from django.tasks import task_backends

        task_backends[IN_PROCESS[name]].clear()  # type: ignore[attr-defined]
        yield name
        task_backends[IN_PROCESS[name]].clear()  # type: ignore[attr-defined]
        return
    if ENGINES[name][0] not in settings.DATABASES:
        if in_ci():
            pytest.fail(f"CI=true but the {name} server is not configured")
        pytest.skip(f"no {name} server on this machine")
    yield name
