"""routing (pure): health, the next instant a model may be sent, limits, the breaker, the choice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ohd.core import routing
from ohd.core.routing import Choice, Health, ModelState, Policy, Usage

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
FREE = "vendor/model:free"
PAID = "vendor/model"
S = timedelta(seconds=1)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_a_fresh_model_is_ready_and_sendable_now() -> None:
    state = ModelState(FREE)
    assert routing.health(state, NOW, Policy()) is Health.READY
    assert routing.next_send(state, Usage(), NOW, Policy()) == NOW


def test_a_cooling_model_waits_for_its_reset() -> None:
    state = ModelState(FREE, cooldown_until=NOW + 30 * S)
    assert routing.health(state, NOW, Policy()) is Health.COOLDOWN
    assert routing.next_send(state, Usage(), NOW, Policy()) == NOW + 30 * S
    assert routing.health(state, NOW + 30 * S, Policy()) is Health.READY


def test_a_dead_model_is_never_sendable() -> None:
    state = ModelState(FREE, dead=True)
    assert routing.health(state, NOW, Policy()) is Health.DEAD
    assert routing.next_send(state, Usage(), NOW, Policy()) is None


def test_the_window_frees_when_the_oldest_counted_request_leaves_it_plus_the_margin() -> None:
    policy = Policy(rpm={PAID: 3})
    usage = Usage(recent=(ago(50), ago(20), ago(10)))
    assert routing.next_send(ModelState(PAID), usage, NOW, policy) == ago(50) + policy.window + policy.margin
    assert routing.next_send(ModelState(PAID), Usage(recent=(ago(50), ago(20))), NOW, policy) == NOW


def test_requests_older_than_the_window_do_not_count() -> None:
    policy = Policy(rpm={PAID: 2})
    usage = Usage(recent=(ago(61), ago(70), ago(5)))
    assert routing.next_send(ModelState(PAID), usage, NOW, policy) == NOW


def test_free_models_default_to_the_free_tier_limit_and_learned_limits_tighten_it() -> None:
    policy = Policy(free_rpm=20)
    assert routing.limits(ModelState(FREE), policy).rpm == 20
    assert routing.limits(ModelState(FREE, learned_rpm=10), policy).rpm == 10
    assert routing.limits(ModelState(PAID), policy).rpm is None
    assert routing.limits(ModelState(PAID, learned_rpm=60), policy).rpm == 60
    assert routing.limits(ModelState(FREE, learned_rpm=10), Policy(rpm={FREE: 30})).rpm == 30


def test_a_daily_limit_waits_until_the_next_utc_midnight() -> None:
    midnight = datetime(2026, 1, 2, tzinfo=UTC)
    assert routing.next_send(ModelState(FREE), Usage(key_today=50), NOW, Policy(free_rpd=50)) == midnight
    assert routing.next_send(ModelState(PAID), Usage(today=5), NOW, Policy(rpd={PAID: 5})) == midnight
    assert routing.next_send(ModelState(PAID), Usage(key_today=500), NOW, Policy(free_rpd=50)) == NOW


def test_the_breaker_opens_after_n_failures_then_half_opens_after_the_reset() -> None:
    policy = Policy(breaker_failures=3, breaker_reset=60 * S)
    state = ModelState(PAID)
    for _ in range(2):
        state = routing.after_failure(state, NOW, policy)
    assert routing.health(state, NOW, policy) is Health.READY and state.failures == 2
    state = routing.after_failure(state, NOW, policy)
    assert routing.health(state, NOW, policy) is Health.OPEN
    assert routing.next_send(state, Usage(), NOW, policy) == NOW + 60 * S
    assert routing.health(state, NOW + 60 * S, policy) is Health.HALF_OPEN
    probe = routing.choose([(state, Usage())], NOW + 60 * S, policy)
    assert probe == Choice(PAID, probe=True)


def test_a_granted_probe_blocks_further_probes_and_a_failed_probe_reopens() -> None:
    policy = Policy(breaker_failures=1, breaker_reset=60 * S)
    state = routing.after_failure(ModelState(PAID), NOW, policy)
    later = NOW + 60 * S
    state = routing.after_probe(state, later)
    assert routing.health(state, later, policy) is Health.OPEN
    state = routing.after_failure(state, later + S, policy)
    assert state.opened_at == later + S
    assert routing.health(routing.after_success(state), later, policy) is Health.READY


def test_a_rate_limit_never_shortens_a_running_cooldown_and_learns_the_limit() -> None:
    state = ModelState(FREE, cooldown_until=NOW + 60 * S)
    assert routing.after_rate_limit(state, NOW + 10 * S, None, NOW).cooldown_until == NOW + 60 * S
    longer = routing.after_rate_limit(state, NOW + 90 * S, 15, NOW)
    assert (longer.cooldown_until, longer.learned_rpm) == (NOW + 90 * S, 15)
    assert routing.after_rate_limit(ModelState(FREE, cooldown_until=ago(5)), NOW + S, 0, NOW).cooldown_until == NOW + S


def test_choose_takes_the_first_sendable_candidate_in_order() -> None:
    a = ModelState("a", cooldown_until=NOW + 30 * S)
    b = ModelState("b")
    c = ModelState("c")
    assert routing.choose([(a, Usage()), (b, Usage()), (c, Usage())], NOW, Policy()) == Choice("b")


def test_choose_returns_the_earliest_instant_when_nothing_can_be_sent() -> None:
    a = ModelState("a", cooldown_until=NOW + 120 * S)
    b = ModelState("b", cooldown_until=NOW + 30 * S)
    dead = ModelState("c", dead=True)
    assert routing.choose([(a, Usage()), (b, Usage()), (dead, Usage())], NOW, Policy()) == Choice(None, NOW + 30 * S)
    assert routing.choose([(dead, Usage())], NOW, Policy()) == Choice(None, None)
    assert routing.choose([], NOW, Policy()) == Choice(None, None)


def test_remaining_counts_what_is_left_this_window_and_today() -> None:
    policy = Policy(free_rpm=20, free_rpd=50)
    usage = Usage(recent=(ago(90), ago(30), ago(1)), today=7, key_today=12)
    assert routing.remaining(ModelState(FREE), usage, NOW, policy) == (18, 38)
    assert routing.remaining(ModelState(PAID), usage, NOW, policy) == (None, None)


def test_utc_midnights() -> None:
    late = datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC)
    assert routing.next_utc_midnight(late) == datetime(2026, 4, 1, tzinfo=UTC)
    assert routing.utc_midnight(late) == datetime(2026, 3, 31, tzinfo=UTC)


def test_candidates_expand_auto_in_order_without_repeats() -> None:
    assert routing.candidates(("b", "auto", "c"), ("a", "b")) == ["b", "a", "c"]
    assert routing.candidates((), ("a", "b")) == ["a", "b"]
