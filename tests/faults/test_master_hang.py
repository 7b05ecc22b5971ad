"""Scenario 2: the Sentinel master hangs (``DEBUG SLEEP``), is replaced, wakes up and is demoted.

While it hangs, a dispatch must give up within ``PUBLISH_TIMEOUT`` (plus a second); what it
sent meanwhile, and what an idle caller writes to it after it wakes up (it still believes it is
the master until the sentinels demote it: the split brain), is gone after the demotion and must
be published again.
"""

from __future__ import annotations

import pytest

from benchmarks.fault_scenarios import (
    IDLE_CALLS,
    PUBLISH_TIMEOUT,
    hang_master_during_dispatch,
    scale_from_env,
)
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("hang_seconds", scale_from_env().hang_seconds)
def test_a_hung_master_blocks_no_dispatch_and_loses_nothing_in_the_split_brain(
        sentinel_topology, rig, scale, hang_seconds) -> None:
    outcome = hang_master_during_dispatch(rig, sentinel_topology, "reliable", hang_seconds,
                                          scale.hang_rate)
    print(outcome.summary())

    assert outcome.max_dispatch_seconds <= PUBLISH_TIMEOUT + 1, outcome.summary()
    assert outcome.dispatched > (2 + 3) * scale.hang_rate / 2 + IDLE_CALLS
    assert outcome.raised == 0, outcome.summary()
    assert outcome.lost == 0, outcome.summary()
    assert outcome.run_twice == 0, outcome.summary()
    assert set(TaskRecord.objects.values_list("state", flat=True)) == {TaskState.SUCCESS}
