"""Scenario 6: ``reconcile_tasks`` from several processes at once, over Sentinel, while beat runs.

The same over a plain Redis is ``tests/test_reconcile.py``'s incident test.
"""

from __future__ import annotations

import pytest

from benchmarks.fault_scenarios import reconcile_while_beat_runs

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]


def test_concurrent_reconciles_never_disturb_beat_over_sentinel(
        sentinel_topology, rig, scale) -> None:
    outcome, beat_log, outputs = reconcile_while_beat_runs(rig, sentinel_topology, scale)
    print(outcome.summary())

    assert outcome.raised == 0, outputs
    assert "beat's lock changed hands" not in outcome.notes
    assert "LockNotOwnedError" not in beat_log
    assert "lost RedBeat's lock" not in beat_log
    assert outcome.lost == 0, outcome.summary()
    assert outcome.run_twice == 0, outcome.summary()
