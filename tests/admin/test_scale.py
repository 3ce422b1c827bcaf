"""The job list with 100,000 jobs: a few queries whatever the rows, no count of the table."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from conveyor.admin.common import CappedPaginator
from conveyor.backends.database.models import Job
from tests.admin.conftest import JOBS

pytestmark = pytest.mark.django_db

MANY = 100_000
# A session, its user, the capped count, the page, and the task filter's latest jobs.
MOST_QUERIES = 5
TABLE = Job._meta.db_table


def insert_jobs(count: int, first: int = 1) -> None:
    """``count`` jobs in one statement (SQLite), alternately succeeded and failed."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH RECURSIVE n(i) AS (
                SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i < {first + count - 1}
            )
            INSERT INTO {TABLE} (uuid, backend_name, queue_name, task_path, priority, state,
                args, kwargs, return_value, errors, worker_ids, options, attempts, lost,
                enqueued_at, available_at, finished_at, delivery, cancel_requested, awaited,
                unique_states)
            SELECT printf('%032x', i), 'default', CASE i % 3 WHEN 0 THEN 'emails' ELSE
                'default' END, 'tests.testapp.tasks.add', 0, CASE i % 2 WHEN 0 THEN
                'succeeded' ELSE 'failed' END, '[1, 2]', '{{}}', '3', '[]', '["w"]', '{{}}', 1,
                0, '2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:01', '',
                0, 0, ''
            FROM n
            """
        )


def queries_of(client, url: str, params: dict[str, str] | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params or {})
    assert response.status_code == 200
    return [query["sql"] for query in captured.captured_queries]


def check_cheap(queries: list[str]) -> None:
    assert len(queries) <= MOST_QUERIES, "\n".join(queries)
    for sql in queries:
        if re.search(r"COUNT\(", sql, re.IGNORECASE):
            assert re.search(r"LIMIT \d+", sql), f"a count without a limit: {sql}"
        if f'FROM "{TABLE}"' in sql:  # the large JSON columns are never read by the list
            for column in ("args", "kwargs", "return_value", "errors", "worker_ids", "options"):
                assert f'"{TABLE}"."{column}"' not in sql, sql


@pytest.mark.skipif(connection.vendor != "sqlite", reason="inserts with SQLite's own SQL")
def test_the_job_list_reads_a_page_not_the_table(admin_client):
    insert_jobs(10)
    few = queries_of(admin_client, JOBS)
    check_cheap(few)
    insert_jobs(MANY, first=11)

    many = queries_of(admin_client, JOBS)
    check_cheap(many)
    assert len(many) == len(few)  # nothing per row
    page = admin_client.get(JOBS).content.decode()
    assert f"More than {CappedPaginator.cap} jobs" in page

    last = str(CappedPaginator.cap // 100)  # pages run up to the cap
    for params in (
        {"state__exact": "failed"},
        {"queue_name": "emails", "task_path": "tests.testapp.tasks.add"},
        {"q": "00000000-0000-0000-0000-00000000beef"},
        {"q": "testapp"},
        {"p": last},
    ):
        check_cheap(queries_of(admin_client, JOBS, params))
    assert len(admin_client.get(JOBS, {"p": last}).context["cl"].result_list) == 100
