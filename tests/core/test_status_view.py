"""`ohd status` as a person reads it: elapsed time, cooldown left, today's usage, throughput and ETA."""

from __future__ import annotations

from typing import Any

from ohd.core.views import eta_seconds, status_text

STATUS: dict[str, Any] = {
    "version": "0.1", "pid": 42, "uptime_s": 3700, "offline": False, "repos": ["/r"],
    "now": "2026-11-25T12:00:00+00:00",
    "queue": {"pending": 1, "queued": 5, "running": 1, "completed": 30, "failed": 0, "cancelled": 0},
    "workers": {"size": 2, "busy": 1},
    "running": [{"id": 7, "type": "unit_test", "target": "a.py", "started_at": "2026-11-25T11:58:30+00:00"}],
    "models": [{"id": "m/a:free", "state": "cooling", "cooldown_until": "2026-11-25T12:00:45+00:00",
                "requests_left_minute": 3, "requests_left_today": 120},
               {"id": "m/b:free", "state": "healthy", "cooldown_until": None,
                "requests_left_minute": 20, "requests_left_today": None}],
    "today": {"calls": 31, "prompt_tokens": 12000, "completion_tokens": 3400, "cost": 0.0123},
    "throughput": {"per_minute": 2.0, "window_s": 600.0, "completed_last_hour": 30, "completed_in_window": 20},
    "eta_s": 180.0,
}


def test_status_text_shows_elapsed_cooldown_today_and_eta() -> None:
    text = status_text(STATUS)
    assert "running #7 unit_test a.py for 1m30s" in text
    assert "m/a:free: cooling (cooldown 0m45s left)  requests left: 3 this minute, 120 today" in text
    assert "m/b:free: healthy  requests left: 20 this minute" in text
    assert "today:   31 calls, 12000+3400 tokens, $0.0123" in text
    assert "2 tasks/min" in text and "30 in the last hour" in text
    assert "ETA for 6 waiting: 3m00s" in text


def test_eta_is_unknown_without_recent_throughput_and_none_when_nothing_waits() -> None:
    assert eta_seconds({"queued": 5, "pending": 1}, 2.0) == 180.0
    assert eta_seconds({"queued": 5}, 0.0) is None
    assert eta_seconds({"queued": 0, "pending": 0}, 0.0) == 0.0
    text = status_text({**STATUS, "eta_s": None, "throughput": {**STATUS["throughput"], "per_minute": 0}})
    assert "ETA for 6 waiting: unknown" in text
    idle = status_text({**STATUS, "queue": {"completed": 3}, "eta_s": 0.0})
    assert "ETA for 0 waiting: none" in idle


def test_status_text_still_reads_an_old_status_without_the_new_fields() -> None:
    old = {k: v for k, v in STATUS.items() if k not in ("now", "today", "throughput", "eta_s")}
    text = status_text(old)
    assert "since 2026-11-25T11:58:30+00:00" in text and "ETA" not in text


def test_status_text_shows_the_budget_against_the_daily_caps_and_whether_paid_models_are_allowed() -> None:
    capped = {**STATUS, "budget": {"requests_today": 12, "daily_request_cap": 40, "cost_today": 0.0123,
                                   "daily_cost_cap_usd": 0.5, "allow_paid": False, "paid_models": ["x/y"]}}
    assert ("budget:  12 of 40 requests today (daily_request_cap), $0.0123 of $0.5 (daily_cost_cap_usd); "
            "paid models refused (strict free-only, except x/y)") in status_text(capped)
    open_ = {**STATUS, "budget": {"requests_today": 3, "daily_request_cap": None, "cost_today": 0,
                                  "daily_cost_cap_usd": None, "allow_paid": True, "paid_models": []}}
    assert ("budget:  3 requests today (no daily_request_cap), $0.0000 (no daily_cost_cap_usd); "
            "paid models allowed") in status_text(open_)


def test_the_eta_is_no_sooner_than_the_last_pending_task_may_run() -> None:
    assert eta_seconds({"queued": 5, "pending": 1}, 2.0, wait_s=3600.0) == 3630.0   # then one more task
    assert eta_seconds({"queued": 5, "pending": 1}, 2.0, wait_s=10.0) == 180.0      # the queue takes longer
    assert eta_seconds({"queued": 5, "pending": 0}, 2.0, wait_s=3600.0) == 150.0      # nothing waits


def _daemon(daemon_id: str, state: str, **more: Any) -> dict[str, Any]:
    return {"id": daemon_id, "state": state, "version": "0.1", "workers": 4, "started_at": "2026-11-25T11:00:00+00:00",
            "heartbeat_age_s": 1.0, "running": 0, "self": False, **more}


def test_status_text_lists_the_fleet_only_when_another_daemon_is_not_stopped() -> None:
    alone = [_daemon("h-1-aa", "alive", self=True), _daemon("h-2-bb", "stopped")]
    assert "fleet:" not in status_text({**STATUS, "fleet": alone})
    fleet = [*alone, _daemon("g-3-cc", "lost", heartbeat_age_s=95.0, running=2)]
    text = status_text({**STATUS, "fleet": fleet})
    assert "fleet:   1 alive, 1 lost, 1 stopped" in text
    assert "  alive h-1-aa (this daemon)  v0.1, 4 workers, up 1h00m, heartbeat 0m01s ago, 0 running" in text
    assert "  lost  g-3-cc  v0.1, 4 workers, up 1h00m, heartbeat 1m35s ago, 2 running" in text
    assert "h-2-bb" not in text
