"""The dashboard in a real browser: headless Chromium (Debian's), driven by Playwright.

Pages load, the charts draw, the panels update without a reload, the buttons act, and a user
who is not staff is refused. The screenshots in the README are taken here: set
``CONVEYOR_SCREENSHOTS`` to a directory to keep them.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.tasks import TaskResultStatus, task_backends
from django.test import Client
from django.utils import timezone

from conveyor import schedules
from conveyor.records import QueueSelector, WorkerInfo
from tests.contract.stores import raised, returned
from tests.dashboard.test_pages import BOOM
from tests.helpers import on
from tests.services import in_ci
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)

BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(what: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true but {what} is not installed")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def browser(django_db_setup: None) -> Any:
    """Debian's Chromium, headless, started by Playwright (which downloads no browser).

    Playwright's sync API keeps an event loop running in this thread while the browser is
    open; Django refuses database calls there unless told that they are meant.
    """
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _missing("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=executable, args=BROWSER_FLAGS)
            yield chromium
            chromium.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    kept = os.environ.get("CONVEYOR_SCREENSHOTS")
    return Path(kept) if kept else tmp_path


def session(live_server: Any, *, staff: bool) -> list[dict[str, str]]:
    """The cookie of a logged-in user (a superuser, or a user who is not staff)."""
    if staff:
        user = User.objects.create_superuser("ops", "ops@example.com", "x")
    else:
        user = User.objects.create_user("visitor", is_staff=False)
    client = Client()
    client.force_login(user)
    value = client.cookies["sessionid"].value
    return [{"name": "sessionid", "value": value, "url": live_server.url}]


def busy_backend() -> dict[str, str]:
    """The default backend with an hour of history, running jobs, failures and workers."""
    alias, backend = "default", task_backends["default"]
    now = timezone.now()
    for worker in ("web-1:2201", "web-1:2202", "batch-2:3107"):
        host, pid = worker.split(":")
        backend.register_worker(
            WorkerInfo(id=worker, backend=alias, kind="process", host=host, pid=int(pid))
        )
    for minute in range(40, 0, -1):
        count = 3 + (minute * 7) % 11
        for i in range(count):
            on(tasks.add, alias).enqueue(minute, i)
        done = backend.claim("web-1:2201", QueueSelector(), count)
        at = now - timedelta(minutes=minute, seconds=5)
        failing = 1 if minute % 9 == 0 else 0
        backend.complete([(job, returned(0, finished_at=at)) for job in done[failing:]])
        for job in done[:failing]:
            backend.fail(job, raised(BOOM, finished_at=at))
    failed = on(tasks.explode, alias).enqueue("the report server said no")
    [claimed] = backend.claim("batch-2:3107", QueueSelector(), 1)
    backend.fail(claimed, raised(BOOM))
    running = on(tasks.log_line, alias).enqueue("/tmp/report.txt", "monthly report")
    [held] = backend.claim("web-1:2202", QueueSelector(), 1)
    backend.heartbeat(["web-1:2202"], [(held.key, held.delivery, now - timedelta(seconds=42))])
    backend.report_progress(held, {"done": 640, "total": 1000, "message": "rendering pages"})
    for i in range(12):
        on(tasks.send_email, alias).enqueue(f"user{i}@example.com")
    for i in range(5):
        on(tasks.add, alias, run_after=now + timedelta(minutes=10 + i)).enqueue(i, i)
    schedules.create("nightly-report", "tests.testapp.tasks.noop", cron="30 2 * * *")
    schedules.create("every-5-minutes", "tests.testapp.tasks.noop", every=300)
    return {"failed": failed.id, "running": running.id}


def test_the_dashboard_in_a_browser(browser, live_server, screenshots, settings):
    settings.CONVEYOR_DASHBOARD_REFRESH = 0.5
    ids = busy_backend()
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    context.add_cookies(session(live_server, staff=True))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    base = f"{live_server.url}/conveyor/"

    response = page.goto(base)
    assert response is not None and response.status == 200
    assert page.title() == "Conveyor overview · default"
    # The charts drew: bars for the minutes in which jobs ended, a line per depth.
    page.wait_for_function("Number(document.querySelector('#throughput-chart').dataset.bars) > 30")
    assert page.locator("#depth-chart polyline").count() == 3
    assert page.locator('[data-stat="ready"]').inner_text() == "12"
    assert page.locator('[data-stat="running"]').inner_text() == "1"
    row = page.locator(f'#running tr[data-job="{ids["running"]}"]')
    assert "640/1000 64% rendering pages" in row.inner_text()

    # The panels update without a reload: a job enqueued now shows within a few looks.
    on(tasks.send_email, "default").enqueue("late@example.com")
    page.wait_for_function(
        "document.querySelector('[data-stat=\"ready\"]').textContent.trim() === '13'",
        timeout=10_000,
    )
    page.wait_for_function("Number(document.querySelector('#depth-chart').dataset.samples) > 2")
    assert page.locator("#live-state").inner_text().startswith("live")
    page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

    # Retry a failure: a new job, and the page says which.
    page.locator(f'#failures tr[data-job="{ids["failed"]}"] button', has_text="Retry").click()
    page.wait_for_load_state()
    said = page.locator(".messages li").first.inner_text()
    assert said.startswith(f"Job {ids['failed']} (tests.testapp.tasks.explode) was enqueued again")
    new_id = said.rsplit("as job ", 1)[1].rstrip(".")
    assert task_backends["default"].get_result(new_id).status == TaskResultStatus.READY

    # Cancel the running job: the page asks first, then its worker is asked to stop it.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'#running tr[data-job="{ids["running"]}"] button', has_text="Cancel").click()
    page.wait_for_load_state()
    assert "its worker was asked to stop it" in page.locator(".messages li").first.inner_text()

    # Pause a queue; dismissing the question changes nothing, accepting pauses it.
    pause = page.locator('#queues tr[data-queue="emails"] button', has_text="Pause")
    page.once("dialog", lambda dialog: dialog.dismiss())
    pause.click()
    assert task_backends["default"].paused_queues() == {}
    page.once("dialog", lambda dialog: dialog.accept())
    pause.click()
    page.wait_for_load_state()
    assert page.locator('#queues tr[data-queue="emails"]').inner_text().count("paused") == 1
    assert "emails" in task_backends["default"].paused_queues()

    page.goto(f"{base}workers/")
    assert page.locator("#workers tr[data-worker]").count() == 3
    page.screenshot(path=str(screenshots / "dashboard-workers.png"), full_page=True)
    page.goto(f"{base}schedules/")
    page.locator('#schedules tr[data-schedule="nightly-report"] button', has_text="Pause").click()
    page.wait_for_load_state()
    assert "'nightly-report' is paused" in page.locator(".messages li").first.inner_text()
    assert schedules.get("nightly-report").paused
    page.screenshot(path=str(screenshots / "dashboard-schedules.png"), full_page=True)
    assert errors == []
    context.close()


def test_the_dashboard_refuses_a_user_who_is_not_staff(browser, live_server):
    context = browser.new_context()
    context.add_cookies(session(live_server, staff=False))
    page = context.new_page()
    response = page.goto(f"{live_server.url}/conveyor/")
    assert response is not None and response.status == 403
    context.close()
    anonymous = browser.new_context()
    page = anonymous.new_page()
    page.goto(f"{live_server.url}/conveyor/")
    assert "/admin/login/" in page.url  # sent to log in
    anonymous.close()
