"""Per-user sliding-window rate limits, their classes and their overrides by tier and scope
(which class a route is in: test_api_endpoint.py)."""

from __future__ import annotations

import threading

import pytest

from rexecd.config import RateLimitsConfig
from rexecd.service.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(create: int = 3, ops: int = 5, read: int = 7) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    cfg = RateLimitsConfig(create_per_min=create, ops_per_min=ops, read_per_min=read)
    return RateLimiter(cfg, clock=clock), clock


def test_allows_up_to_the_limit_then_refuses() -> None:
    rl, _ = limiter(create=3)
    decisions = [rl.check("u", "create") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in decisions)
    assert decisions[-1].retry_after_s == pytest.approx(60.0)
    assert decisions[-1].retry_after_header == 60
    assert decisions[0].retry_after_header == 0


def test_window_slides() -> None:
    rl, clock = limiter(create=2)
    rl.check("u", "create")
    clock.now += 30
    rl.check("u", "create")
    clock.now += 10
    refused = rl.check("u", "create")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(20.0)
    clock.now += 20
    assert rl.check("u", "create").allowed, "the first request left the window"
    assert not rl.check("u", "create").allowed


def test_refusals_do_not_extend_the_wait() -> None:
    rl, clock = limiter(create=1)
    rl.check("u", "create")
    for _ in range(10):
        clock.now += 5
        rl.check("u", "create")
    clock.now += 10.5
    assert rl.check("u", "create").allowed


def test_classes_and_users_are_independent() -> None:
    rl, _ = limiter(create=1, ops=1, read=1)
    assert rl.check("u", "create").allowed
    assert rl.check("u", "ops").allowed
    assert rl.check("u", "read").allowed
    assert rl.check("v", "create").allowed
    assert not rl.check("u", "create").allowed


def test_peek_does_not_count_and_reset_forgets() -> None:
    rl, _ = limiter(read=2)
    assert rl.peek("u", "read").remaining == 2
    rl.check("u", "read")
    assert rl.peek("u", "read").remaining == 1
    assert rl.peek("u", "read").remaining == 1
    rl.reset("u")
    assert rl.peek("u", "read").remaining == 2


def test_set_limits_takes_effect() -> None:
    rl, _ = limiter(create=1)
    rl.check("u", "create")
    rl.set_limits(RateLimitsConfig(create_per_min=3))
    assert rl.check("u", "create").remaining == 1
    assert rl.limit("create") == 3


def test_idle_users_are_swept() -> None:
    rl, clock = limiter()
    for i in range(2000):
        rl.check(f"user{i}", "read")
    clock.now += 61
    for _ in range(1100):
        rl.check("active", "read")
    assert len(rl._hits) < 10


def test_thread_safe_exact_count() -> None:
    rl = RateLimiter(RateLimitsConfig(create_per_min=50))
    allowed: list[bool] = []
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(25):
            allowed.append(rl.check("u", "create").allowed)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 50


def test_exec_shares_the_create_window_unless_it_has_its_own() -> None:
    rl, _ = limiter(create=2)
    assert rl.check("u", "create").allowed and rl.check("u", "exec").allowed
    assert not rl.check("u", "exec").allowed and not rl.check("u", "create").allowed
    own = RateLimiter(RateLimitsConfig(create_per_min=1, exec_per_min=3))
    assert own.check("u", "create").allowed and not own.check("u", "create").allowed
    assert [own.check("u", "exec").allowed for _ in range(4)] == [True, True, True, False]
    assert own.limit("exec") == 3


def test_tier_then_scope_overrides() -> None:
    cfg = RateLimitsConfig.model_validate(
        {
            "create_per_min": 10,
            "tiers": {"pro": {"create_per_min": 20, "exec_per_min": 30}},
            "scopes": {"write": {"create_per_min": 5}, "read": {"read_per_min": 1}},
        }
    )
    rl = RateLimiter(cfg)
    assert rl.limit("create") == 10 and rl.limit("exec") == 10
    assert rl.limit("create", "free") == 10
    assert rl.limit("create", "pro") == 20 and rl.limit("exec", "pro") == 30
    # The token's broadest scope with an override wins over the tier.
    assert rl.limit("create", "pro", {"read", "write"}) == 5
    assert rl.limit("exec", "pro", {"read", "write"}) == 30
    assert rl.limit("read", "free", {"read"}) == 1
    assert rl.limit("read", "free", {"read", "write"}) == 120
    decision = rl.check("u", "create", "pro")
    assert (decision.limit, decision.remaining) == (20, 19)


def test_admin_is_exempt_by_default_and_the_list_is_configurable() -> None:
    rl, _ = limiter()
    assert rl.exempt({"read", "write", "admin"}) and not rl.exempt({"read", "write"})
    none = RateLimiter(RateLimitsConfig(exempt_scopes=[]))
    assert not none.exempt({"admin"})
    writers = RateLimiter(RateLimitsConfig(exempt_scopes=["write"]))
    assert writers.exempt({"read", "write"}) and not writers.exempt({"read"})


@pytest.mark.parametrize(
    "bad",
    [
        {"tiers": {"platinum": {"create_per_min": 1}}},
        {"scopes": {"root": {"create_per_min": 1}}},
        {"exempt_scopes": ["root"]},
        {"tiers": {"pro": {"create_per_min": 0}}},
        {"exec_per_min": 0},
    ],
)
def test_bad_rate_config_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RateLimitsConfig.model_validate(bad)
