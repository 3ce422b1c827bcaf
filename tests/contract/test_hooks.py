"""Hooks run after the outcome is stored, and never change it."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.tasks import TaskResultStatus, task

from conveyor.exceptions import InvalidTaskOption
from conveyor.testing import RunSummary, run_until_done
from tests.helpers import job, on
from tests.testapp import tasks


def test_success_and_complete_hooks_see_the_stored_result(backend_alias, tmp_path: Path):
    notes = tmp_path / "notes"
    ok = on(tasks.hooked, backend_alias).enqueue(str(notes), False)
    bad = on(tasks.hooked, backend_alias).enqueue(str(notes), True)
    assert run_until_done(backend_alias) == RunSummary(succeeded=1, failed=1)
    assert sorted(notes.read_text().splitlines()) == sorted(
        [f"SUCCESSFUL {ok.id} fine"] * 2 + [f"FAILED {bad.id} None"]  # on_complete only
    )


def test_a_failing_hook_is_logged_and_changes_nothing(backend_alias, tmp_path: Path, caplog):
    notes = tmp_path / "notes"
    bad = on(tasks.hooked_on_failure, backend_alias).enqueue(str(notes), True)
    ok = on(tasks.hooked_on_failure, backend_alias).enqueue(str(notes), False)
    assert run_until_done(backend_alias) == RunSummary(succeeded=1, failed=1)
    assert notes.read_text().splitlines() == [f"FAILED {bad.id} None"]
    assert job(ok).status == TaskResultStatus.SUCCESSFUL
    assert job(bad).status == TaskResultStatus.FAILED
    assert "The on_complete hook of task tests.testapp.tasks.hooked_on_failure failed" in (
        caplog.text
    )
    assert "the hook itself is broken" in caplog.text


def module_level(x: int) -> int:
    return x


@pytest.mark.parametrize("hook", [42, "not a path", "a..b", ""])
def test_a_hook_must_be_callable_or_a_dotted_path(hook):
    with pytest.raises(InvalidTaskOption, match=r"on_success must be a callable or a dotted"):
        task(on_success=hook)(module_level)


def test_hooks_cannot_be_changed_per_call():
    with pytest.raises(InvalidTaskOption, match=r"on_failure cannot be changed per call"):
        tasks.hooked.using(on_failure=print)
