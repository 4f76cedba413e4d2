"""Cron schedules of standing rules: validation, next firing, the missed-firing policy.

The only room that imports APScheduler, and it never runs APScheduler's scheduler
thread: a `CronTrigger` is only asked for firing times at an injected `now`
(`get_next_fire_time`). Invariant of the policy (`decide`): however many firings passed
since the last one acted on, at most ONE runs, and only if the latest of them is
within `grace` of `now`; older ones are skipped (logged by the caller), so a daemon
that was down for a week does not wake up to a week of nightly tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from apscheduler.triggers.cron import CronTrigger

from ohd.errors import TaskFileError

log = logging.getLogger("ohd.schedule")

Trigger = CronTrigger     # what other rooms name, so that only this room imports APScheduler
ONE_US = timedelta(microseconds=1)
MAX_WALK = 100_000   # bound on firings walked inside one grace window
# cron's nicknames, as crontab(5) defines them (APScheduler's from_crontab knows none); @reboot is
# not one: a rule fires while the daemon runs, not at boot
NICKNAMES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
             "@weekly": "0 0 * * sun", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@hourly": "0 * * * *"}
# cron(5)'s days of week, 0 (and 7) being Sunday; APScheduler numbers them from Monday = 0, so
# ohd never hands it a number, a range or a step of days: it expands the field into names
CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def compile_cron(expr: str, tz: tzinfo | None, source: str) -> CronTrigger:
    """A trigger for a 5-field cron expression, or a nickname (`@daily`), in `tz` (None: local time).

    An invalid expression is a `TaskFileError` naming the `schedule` field, so the
    rule file can be rejected into `.rejected/` with that message.
    """
    if expr.strip().startswith("@"):
        nickname = expr.strip().lower()
        if nickname not in NICKNAMES:
            raise TaskFileError(source, f"'{expr}' is not a cron nickname ohd knows: "
                                f"{', '.join(NICKNAMES)}", field="schedule")
        expr = NICKNAMES[nickname]
    if len(expr.split()) != 5:
        raise TaskFileError(source, f"'{expr}' is not a cron expression of 5 space-separated fields",
                            field="schedule")
    minute, hour, day, month, day_of_week = expr.split()
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=cron_days_of_week(day_of_week), timezone=tz)
    except (ValueError, TypeError) as exc:
        raise TaskFileError(source, f"'{expr}' is not a valid cron expression: {exc}",
                            field="schedule") from None


def cron_days_of_week(field: str) -> str:
    """cron(5)'s day-of-week `field` (`0`, `7`, `1-5`, `5-7`, `*/2`, `mon-fri`, lists of them) as
    the comma-separated day names APScheduler means the same days by; `*` stays `*`.

    A `ValueError` names an element that is no cron day of week.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for element in field.lower().split(","):
        span, _, step_text = element.partition("/")
        if span == "*":
            first, last = 0, 7
        else:
            start, dash, end = span.partition("-")
            first = _cron_day(start, element)
            last = _cron_day(end, element, ending=True) if dash else (7 if step_text else first)
        step = int(step_text) if step_text.isdigit() else 0 if step_text else 1
        if step < 1 or last < first:
            raise ValueError(f"'{element}' is not a day of week of cron (0-7 or sun-sat, "
                             f"0 and 7 being Sunday)")
        days.update(number % 7 for number in range(first, last + 1, step))
    return ",".join(CRON_DAYS[number] for number in sorted(days))


def _cron_day(text: str, element: str, ending: bool = False) -> int:
    """One day of week of cron, as a number 0-7 (`sun` ending a range is 7)."""
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in CRON_DAYS:
        number = CRON_DAYS.index(text)
        return 7 if ending and number == 0 else number
    raise ValueError(f"'{element}' is not a day of week of cron (0-7 or sun-sat, 0 and 7 being Sunday)")


def next_fire(trigger: CronTrigger, after: datetime) -> datetime | None:
    """The first firing strictly after `after` (None when the trigger has ended)."""
    return at_or_after(trigger, after + ONE_US)


def at_or_after(trigger: CronTrigger, moment: datetime) -> datetime | None:
    """The first firing at or after `moment`."""
    fire: datetime | None = trigger.get_next_fire_time(None, moment)
    return fire


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about the firings since `last`: run `fire` (or nothing), then remember `mark`.

    `mark` is None when nothing is due yet; `skipped` tells the caller that firings
    older than the grace period were dropped.
    """

    fire: datetime | None
    mark: datetime | None
    skipped: bool = False


def decide(trigger: CronTrigger, last: datetime, now: datetime, grace: timedelta) -> Decision:
    """Apply the missed-firing policy to the firings after `last`, up to `now`."""
    due = next_fire(trigger, last)
    if due is None or due > now:
        return Decision(fire=None, mark=None)
    in_window = at_or_after(trigger, max(due, now - grace))
    if in_window is None or in_window > now:
        return Decision(fire=None, mark=now, skipped=True)
    latest = in_window
    for _ in range(MAX_WALK):
        following = next_fire(trigger, latest)
        if following is None or following > now:
            break
        latest = following
    return Decision(fire=latest, mark=latest, skipped=latest != due)
