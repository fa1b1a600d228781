"""Hypothesis profiles and shared fixtures.

Profiles: "ci" (the default) keeps the whole suite around a minute on two cores;
"thorough" searches much harder, for a nightly run or after touching the core:

    HYPOTHESIS_PROFILE=thorough pytest tests
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from support import T0, FakeClock

import engine

# No deadlines: a query that lands on a compaction, or a busy CI box, is slow without
# being wrong, and these tests check answers, never speed.
settings.register_profile(
    "ci",
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1_000,
    stateful_step_count=80,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Time-to-live of the indexes the fixtures build (the engine's default).
TTL_S = 1800


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def index(clock: FakeClock) -> engine.LocationIndex:
    """An empty index on a fake clock."""
    return engine.LocationIndex(ttl_s=TTL_S, clock=clock)
