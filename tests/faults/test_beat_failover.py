"""Scenario 5: beat keeps every periodic slot, once, through a Sentinel failover."""

from __future__ import annotations

import pytest

from benchmarks.fault_scenarios import beat_through_failover

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]


def test_beat_through_a_failover_runs_every_slot_once(sentinel_topology, rig, scale) -> None:
    outcome = beat_through_failover(rig, sentinel_topology, "reliable", scale)
    print(outcome.summary())

    assert outcome.dispatched >= scale.beat_schedules * scale.beat_seconds_after_failover
    assert outcome.lost == 0, outcome.summary()  # no slot missed, none recorded and not run
    assert outcome.run_twice == 0, outcome.summary()  # one ledger row and one run per slot
