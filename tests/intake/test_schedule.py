"""schedule: cron validation, next firing at an injected `now`, the missed-firing policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ohd.errors import TaskFileError
from ohd.intake.schedule import compile_cron, decide, next_fire

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NIGHTLY = compile_cron("0 3 * * *", UTC, "tasks.d/nightly.yaml")


@pytest.mark.parametrize("expr", ["61 * * * *", "* * * *", "* * * * * *", "0 3 * * funday", "a b c d e"])
def test_an_invalid_cron_is_a_task_file_error_naming_the_schedule_field(expr: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        compile_cron(expr, UTC, "tasks.d/bad.yaml")
    assert caught.value.field == "schedule"
    assert str(caught.value).startswith("tasks.d/bad.yaml: field 'schedule': ")
    assert expr in str(caught.value)


def test_next_fire_is_strictly_after_the_given_time() -> None:
    assert next_fire(NIGHTLY, T0) == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    at_three = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert next_fire(NIGHTLY, at_three) == datetime(2026, 1, 3, 3, 0, tzinfo=UTC)


def test_the_timezone_of_the_schedule_is_honoured() -> None:
    paris = compile_cron("0 3 * * *", ZoneInfo("Europe/Paris"), "r.yaml")
    assert next_fire(paris, T0) == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)   # 03:00 CET


def test_nothing_is_due_before_the_next_firing() -> None:
    decision = decide(NIGHTLY, T0, T0 + timedelta(hours=14), timedelta(hours=1))
    assert decision.fire is None and decision.mark is None


def test_a_firing_on_time_runs() -> None:
    due = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    decision = decide(NIGHTLY, T0, due, timedelta(seconds=1))
    assert decision.fire == due and decision.mark == due and not decision.skipped


def test_many_missed_firings_within_grace_run_once_the_latest() -> None:
    every_minute = compile_cron("* * * * *", UTC, "r.yaml")
    now = T0 + timedelta(minutes=30, seconds=20)
    decision = decide(every_minute, T0, now, timedelta(hours=1))
    assert decision.fire == T0 + timedelta(minutes=30)
    assert decision.skipped
    assert decide(every_minute, decision.fire, now, timedelta(hours=1)).fire is None


def test_a_missed_firing_beyond_grace_is_skipped_and_remembered() -> None:
    now = datetime(2026, 1, 4, 6, 0, tzinfo=UTC)   # three nights missed, the last 3 h ago
    decision = decide(NIGHTLY, T0, now, timedelta(hours=1))
    assert decision.fire is None and decision.skipped and decision.mark == now
    assert decide(NIGHTLY, now, now, timedelta(hours=1)).mark is None


@pytest.mark.parametrize(("nickname", "first"), [
    ("@hourly", datetime(2026, 1, 1, 13, 0, tzinfo=UTC)),
    ("@daily", datetime(2026, 1, 2, 0, 0, tzinfo=UTC)),
    ("@midnight", datetime(2026, 1, 2, 0, 0, tzinfo=UTC)),
    ("@weekly", datetime(2026, 1, 4, 0, 0, tzinfo=UTC)),          # 2026-01-04 is a Sunday
    ("@monthly", datetime(2026, 2, 1, 0, 0, tzinfo=UTC)),
    ("@yearly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    ("@annually", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    (" @Daily ", datetime(2026, 1, 2, 0, 0, tzinfo=UTC)),
])
def test_cron_nicknames_are_their_5_field_expressions(nickname: str, first: datetime) -> None:
    assert next_fire(compile_cron(nickname, UTC, "r.yaml"), T0) == first


@pytest.mark.parametrize("nickname", ["@reboot", "@often"])
def test_an_unknown_or_reboot_nickname_is_refused_naming_the_known_ones(nickname: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        compile_cron(nickname, UTC, "tasks.d/bad.yaml")
    assert caught.value.field == "schedule" and nickname in str(caught.value) and "@daily" in str(caught.value)


# what cron(5) means by each day-of-week field: the days (0 = Sunday ... 6 = Saturday) it fires on
CRON_DAY_FIELDS = [
    ("0", {0}), ("7", {0}), ("1", {1}), ("6", {6}), ("1-5", {1, 2, 3, 4, 5}), ("5-7", {5, 6, 0}),
    ("0-6", {0, 1, 2, 3, 4, 5, 6}), ("0,6", {0, 6}), ("6,7", {6, 0}), ("*/2", {0, 2, 4, 6}),
    ("*/3", {0, 3, 6}), ("1-5/2", {1, 3, 5}), ("0-7/7", {0}), ("2/2", {2, 4, 6}), ("sun", {0}),
    ("mon-fri", {1, 2, 3, 4, 5}), ("fri-sun", {5, 6, 0}), ("SAT,sun", {6, 0}), ("1,sat-sun", {1, 6, 0}),
    ("*", {0, 1, 2, 3, 4, 5, 6}),
]


@pytest.mark.parametrize(("field", "cron_days"), CRON_DAY_FIELDS)
def test_days_of_week_mean_what_cron_means_sunday_being_0_and_7(field: str, cron_days: set[int]) -> None:
    trigger = compile_cron(f"0 3 * * {field}", UTC, "r.yaml")
    fired: set[int] = set()
    fire = next_fire(trigger, T0)
    while fire is not None and fire < T0 + timedelta(days=14):     # two weeks of firings
        fired.add(fire.isoweekday() % 7)                           # isoweekday: Monday 1 ... Sunday 7
        fire = next_fire(trigger, fire)
    assert fired == cron_days


def test_a_sunday_night_job_fires_on_sunday_not_a_day_late() -> None:
    sunday = compile_cron("0 3 * * 0", UTC, "r.yaml")
    assert next_fire(sunday, T0) == datetime(2026, 1, 4, 3, 0, tzinfo=UTC)   # 2026-01-01 is a Thursday
    weekdays = compile_cron("30 8 * * 1-5", UTC, "r.yaml")
    assert next_fire(weekdays, datetime(2026, 1, 2, 9, 0, tzinfo=UTC)) == datetime(2026, 1, 5, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize("field", ["8", "5-0", "*/0", "mon-", "1-5/x", "funday", "5#2"])
def test_a_day_of_week_cron_does_not_know_is_refused(field: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        compile_cron(f"0 3 * * {field}", UTC, "tasks.d/bad.yaml")
    assert caught.value.field == "schedule" and field in str(caught.value)
