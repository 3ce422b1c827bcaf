"""Fixtures shared by every test: the engines, a backend per engine, worker subprocesses."""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.services import in_ci

# Engine name -> (DATABASES alias, TASKS alias).
ENGINES = {
    "sqlite": ("default", "default"),
    "postgres": ("postgres", "postgres"),
    "mysql": ("mysql", "mysql"),
}
# Stores that live in the test process only: contract tests run on them too.
IN_PROCESS = {"memory": "memory"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each engine-parametrised test a transactional database of its engine."""
    for item in items:
        engine = getattr(item, "callspec", None) and item.callspec.params.get("engine")
        if not engine or engine in IN_PROCESS:
            continue
        alias = ENGINES[engine][0]
        if alias in settings.DATABASES:
            item.add_marker(pytest.mark.django_db(databases=[alias], transaction=True))
        else:
            item.add_marker(pytest.mark.skip(reason=f"no {engine} server on this machine"))


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    """Each database engine Conveyor supports; absent servers skip (fail under CI=true)."""
    name: str = request.param
    if ENGINES[name][0] not in settings.DATABASES:
        if in_ci():
            pytest.fail(f"CI=true but the {name} server is not configured")
        pytest.skip(f"no {name} server on this machine")
    return name


@pytest.fixture
def backend_alias(engine: str) -> str:
    if engine in IN_PROCESS:
        return IN_PROCESS[engine]
    return ENGINES[engine][1]


@pytest.fixture
def backend(backend_alias: str):  # type: ignore[no-untyped-def]
    from django.tasks import task_backends

    return task_backends[backend_alias]


@pytest.fixture
def unreachable(settings, django_db_blocker):  # type: ignore[no-untyped-def]
    """The alias of a Conveyor backend whose database cannot be opened."""
    import copy

    from django.db import connections

    connections.settings["nowhere"] = {
        **copy.deepcopy(connections.settings["default"]),
        "NAME": "/nonexistent-directory/conveyor.sqlite3",
    }
    settings.TASKS = {
        **settings.TASKS,
        "unreachable": {
            "BACKEND": "conveyor.backends.database.DatabaseBackend",
            "QUEUES": ["default"],
            "OPTIONS": {"DATABASE": "nowhere"},
        },
    }
    try:
        with django_db_blocker.unblock():
            yield "unreachable"
    finally:
        connections["nowhere"].close()
        del connections["nowhere"]
        del connections.settings["nowhere"]
