"""What the admin, the health report and the metrics show of concurrency and rate limits.

Rows get their limits from ``dispatch()`` and their WAITING state from the workers' own claim
(``ledger.claim(..., limited=True)``) against the test database, several "workers" told apart
by name, as in ``tests/test_limits.py``. The admin is driven through Django's test client.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from prometheus_client import CollectorRegistry

from example_project.demo.tasks import add
from reliable_tasks import dispatch, health, ledger, limits
from reliable_tasks.admin import widgets
from reliable_tasks.admin.filters import RecentValuesListFilter
from reliable_tasks.conf import app_settings
from reliable_tasks.metrics import LedgerCollector, limit_load, registry
from reliable_tasks.models import TaskRecord, WaitReason
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:reliable_tasks_taskrecord_changelist")
HEALTH = reverse("admin:reliable_tasks_health")
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


# --- helpers -------------------------------------------------------------------------------------


def limited(count: int, key: str = "exports", limit: int = 3, **options: Any) -> list[TaskRecord]:
    """``count`` tasks of one concurrency key, dispatched in this order."""
    return [dispatch(add, (index, index), concurrency_key=key, concurrency_limit=limit,
                     **options) for index in range(count)]


def rated(count: int, key: str = "api", rate: str = "1/h") -> list[TaskRecord]:
    return [dispatch(add, (index, index), rate_key=key, rate_limit=rate)
            for index in range(count)]


def claim(row: TaskRecord, worker: str) -> ledger.Claim:
    return ledger.claim(str(row.pk), task_name=row.task_name, worker=worker,
                        rerun_after_lost=False, limited=True)


def claim_all(rows: Sequence[TaskRecord], prefix: str = "w") -> list[ledger.Claim]:
    return [claim(row, f"{prefix}{index}") for index, row in enumerate(rows)]


def fresh(row: TaskRecord) -> TaskRecord:
    return TaskRecord.objects.get(pk=row.pk)


def waited_since(row: TaskRecord, seconds: float) -> None:
    """Make ``row`` look published (and deferred) ``seconds`` ago."""
    TaskRecord.objects.filter(pk=row.pk).update(
        published_at=timezone.now() - timedelta(seconds=seconds))


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def page(client: Client, url: str, **params: str) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, (url, params)
    return html.unescape(response.content.decode())


def listed(client: Client, **params: str) -> set[Any]:
    response = client.get(CHANGELIST, params)
    assert response.status_code == 200, params
    return {row.pk for row in response.context["cl"].result_list}


def change_page(client: Client, row: TaskRecord) -> str:
    return page(client, reverse("admin:reliable_tasks_taskrecord_change", args=[row.pk]))


def fields_of(client: Client, row: TaskRecord) -> dict[str, str]:
    """The read-only fields of ``row``'s page: name -> what it shows."""
    response = client.get(reverse("admin:reliable_tasks_taskrecord_change", args=[row.pk]))
    assert response.status_code == 200
    return {line.field["name"]: str(line.contents())
            for fieldset in response.context["adminform"] for fieldline in fieldset
            for line in fieldline}


# --- the admin: a task's page ------------------------------------------------------------------


def test_a_task_waiting_for_a_slot_says_how_many_run_and_wait_ahead_of_it(root):
    rows = limited(6)
    claim_all(rows)

    text = change_page(root, rows[4])

    assert ("Waiting for a slot of concurrency key 'exports' (limit 3: 3 running, "
            "1 waiting ahead)") in text
    assert "A slot is free" not in text
    assert "Waiting for a slot of concurrency key 'exports' (limit 3: 3 running, 0 waiting " \
           "ahead)" in change_page(root, rows[3])
    fields = fields_of(root, rows[4])
    assert (fields["waiting_for"], fields["deferrals"]) == ("Concurrency limit", "1")


def test_a_woken_task_and_the_waiters_behind_it_count_its_promised_slot(root):
    rows = limited(5, limit=2)
    claims = claim_all(rows)
    assert ledger.record_success(str(rows[0].pk), claims[0])
    assert [row.pk for row in limits.wake("exports")] == [rows[2].pk]

    assert ("Woken for a slot of concurrency key 'exports': the slot is its own until it "
            "starts.") in change_page(root, rows[2])
    assert ("Waiting for a slot of concurrency key 'exports' (limit 2: 1 running, 1 woken, "
            "1 waiting ahead)") in change_page(root, rows[4])


def test_a_waiter_whose_key_has_a_free_slot_says_the_sweeper_wakes_it(root):
    rows = limited(2, limit=1)
    claims = claim_all(rows)
    assert ledger.record_success(str(rows[0].pk), claims[0])  # its worker died before waking

    assert ("(limit 1: 0 running, 0 waiting ahead). A slot is free: the sweeper wakes the "
            "oldest waiters on its next pass.") in change_page(root, rows[1])


def test_a_task_waiting_for_its_rate_says_when_it_is_sent_again(root):
    rows = rated(2)
    claim_all(rows)
    waiting = fresh(rows[1])
    assert waiting.state == TaskState.WAITING and waiting.next_attempt_at is not None

    text = change_page(root, waiting)

    assert (f"Waiting for the rate limit 1/h of 'api': sent again at "
            f"{widgets.moment(waiting.next_attempt_at)} (in 59 min") in text
    assert fields_of(root, waiting)["waiting_for"] == "Rate limit"


def test_a_task_whose_rate_start_is_due_says_it_goes_first(root):
    rows = rated(2)
    claim_all(rows)
    TaskRecord.objects.filter(pk=rows[1].pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert limits.wake_due_rate_waiters(timezone.now(), 10) == 1

    assert ("Its start under the rate limit 1/h of 'api' is due: it starts ahead of newer "
            "tasks of the key.") in change_page(root, rows[1])


def test_a_limited_task_shows_its_keys_limits_and_deferrals(root):
    row = dispatch(add, (1, 1), concurrency_key="exports", concurrency_limit=3,
                   rate_key="api", rate_limit="10/s")
    TaskRecord.objects.filter(pk=row.pk).update(deferrals=4)

    fields = fields_of(root, row)

    assert (fields["concurrency_key"], fields["concurrency_limit"]) == ("exports", "3")
    assert (fields["rate_key"], fields["rate_limit"]) == ("api", "10/s")
    assert fields["deferrals"] == "4"
    assert fields["waiting_reason"] == fields["waiting_for"] == "-"  # PENDING: nothing


def test_a_task_without_limits_has_no_limits_section(root):
    row = dispatch(add, (1, 1))

    response = root.get(reverse("admin:reliable_tasks_taskrecord_change", args=[row.pk]))

    names = [fieldset.name for fieldset in response.context["adminform"]]
    assert "Limits" not in names and "Arguments" in names


def test_waiting_is_a_badge_of_its_own_colour_and_every_state_has_one():
    assert set(TaskState.values) <= set(widgets.STATE_COLORS)
    assert len(set(widgets.STATE_COLORS.values())) == len(widgets.STATE_COLORS)
    badge = widgets.state_badge(TaskState.WAITING, "Waiting for a slot")
    assert f"background:{widgets.STATE_COLORS[TaskState.WAITING]}" in badge
    assert 'title="Waiting for a slot"' in badge


def test_the_list_s_badge_of_a_waiting_task_says_what_it_waits_for(root):
    rows = limited(2, key="exports", limit=1) + rated(2)
    claim_all(rows)

    text = page(root, CHANGELIST)

    assert 'title="Waiting for a slot of concurrency key \'exports\'"' in text
    assert 'title="Waiting for the rate limit 1/h of \'api\'"' in text


def test_keys_are_escaped_wherever_they_are_shown(root):
    rows = limited(2, key=XSS, limit=1)
    claim_all(rows)

    for url in (CHANGELIST, HEALTH,
                reverse("admin:reliable_tasks_taskrecord_change", args=[rows[1].pk])):
        content = root.get(url).content.decode()
        assert XSS not in content, url
        assert XSS_ESCAPED in content, url


# --- the admin: the list's filters and search --------------------------------------------------


def test_the_list_filters_by_what_a_task_waits_for(root):
    slots = limited(4, limit=1)
    claims = claim_all(slots)
    assert ledger.record_revoked(str(slots[3].pk), expired=False)  # waits no more
    assert fresh(slots[3]).waiting_for == WaitReason.CONCURRENCY
    rates = rated(2)
    claim_all(rates, prefix="r")
    plain = dispatch(add, (1, 1))
    everything = {row.pk for row in (*slots, *rates, plain)}

    assert listed(root, waiting_for="concurrency") == {slots[1].pk, slots[2].pk}
    assert listed(root, waiting_for="rate") == {rates[1].pk}
    assert listed(root, waiting_for="none") == {slots[0].pk, slots[3].pk, rates[0].pk,
                                                plain.pk}
    # A woken task still waits (to start); once it started, it no longer does.
    assert ledger.record_success(str(slots[0].pk), claims[0])
    limits.wake("exports")
    assert fresh(slots[1]).state == TaskState.PENDING
    assert listed(root, waiting_for="concurrency") == {slots[1].pk, slots[2].pk}
    assert claim(slots[1], "w1-again").won
    assert listed(root, waiting_for="concurrency") == {slots[2].pk}
    assert listed(root) == everything


def test_the_list_filters_by_having_a_key_and_by_key(root):
    exports = limited(2, key="exports", limit=5)
    imports = limited(1, key="imports", limit=5)
    api = rated(1)
    both = dispatch(add, (1, 1), concurrency_key="exports", concurrency_limit=5,
                    rate_key="api", rate_limit="1/h")
    plain = dispatch(add, (1, 1))

    assert listed(root, limited_by="concurrency") == {
        *(row.pk for row in exports), imports[0].pk, both.pk}
    assert listed(root, limited_by="rate") == {api[0].pk, both.pk}
    assert listed(root, limited_by="none") == {plain.pk}
    assert listed(root, concurrency_key="exports") == {*(row.pk for row in exports), both.pk}
    assert listed(root, rate_key="api") == {api[0].pk, both.pk}
    assert listed(root, rate_key="unknown") == set()
    text = page(root, CHANGELIST)
    for choice in ("?waiting_for=concurrency", "?waiting_for=rate", "?waiting_for=none",
                   "?limited_by=concurrency", "?limited_by=rate", "?limited_by=none",
                   "?concurrency_key=exports", "?concurrency_key=imports", "?rate_key=api"):
        assert choice in text, choice


@pytest.mark.parametrize("params", [{"waiting_for": "soon"}, {"limited_by": "everything"},
                                    {"waiting_for": ""}])
def test_a_filter_value_that_is_not_a_choice_is_refused(root, params):
    dispatch(add, (1, 1))

    response = root.get(CHANGELIST, params)

    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")


def test_the_value_filters_read_their_choices_in_one_bounded_query(root):
    limited(2)
    rated(1)

    with CaptureQueriesContext(connection) as queries:
        assert root.get(CHANGELIST).status_code == 200

    samples = [query["sql"] for query in queries.captured_queries
               if f"LIMIT {RecentValuesListFilter.sample_size}" in query["sql"]]
    assert len(samples) == 1
    for column in ("task_name", "queue", "concurrency_key", "rate_key"):
        assert column in samples[0]


def test_search_matches_a_whole_concurrency_or_rate_key(root):
    exports = limited(1, key="exports:42")
    api = rated(1, key="api.example.com")
    other = limited(1, key="exports:4")

    def found(term: str) -> set[Any]:
        return listed(root, q=term)

    assert found("exports:42") == {exports[0].pk}
    assert found("exports:4") == {other[0].pk}
    assert found("api.example.com") == {api[0].pk}
    assert found("api.example") == set()  # a key matches whole, as a unique key does


# --- the health report and page ----------------------------------------------------------------


def test_the_report_lists_concurrency_keys_with_running_woken_and_waiting_tasks():
    exports = limited(6, key="exports", limit=2)
    claims = claim_all(exports)
    assert ledger.record_success(str(exports[0].pk), claims[0])
    limits.wake("exports")  # exports[2] holds the free slot until it starts
    imports = limited(2, key="imports", limit=4)
    claim_all(imports, prefix="i")
    limited(1, key="idle")  # PENDING, never delivered: not listed

    report = health.report()

    assert report.limits is not None
    found = [(item.key, item.limit, item.running, item.woken, item.waiting)
             for item in report.limits.concurrency]
    assert found == [("exports", 2, 1, 1, 3), ("imports", 4, 2, 0, 0)]
    assert report.limits.concurrency[0].waiting_since == fresh(exports[3]).created_at
    assert report.limits.concurrency[1].waiting_since is None
    assert report.limits.other_concurrency.keys == 0
    assert report.stuck_waits == []


def test_the_report_lists_rate_keys_with_waiting_tasks_and_the_next_start():
    api = rated(3, key="api")
    claim_all(api)
    mail = rated(2, key="mail", rate="10/m")
    claim_all(mail, prefix="m")

    report = health.report()

    assert report.limits is not None
    assert [(item.key, item.rate, item.waiting) for item in report.limits.rate] == [
        ("api", "1/h", 2), ("mail", "10/m", 1)]
    assert report.limits.rate[0].next_at == fresh(api[1]).next_attempt_at


def test_the_report_lists_the_busiest_keys_and_sums_the_others(monkeypatch):
    monkeypatch.setattr(health, "KEYS_SHOWN", 2)
    for key, waiting in (("a", 1), ("b", 3), ("c", 2), ("d", 0)):
        claim_all(limited(waiting + 1, key=key, limit=1), prefix=key)
    for key, waiting in (("r1", 1), ("r2", 2), ("r3", 3)):
        claim_all(rated(waiting + 1, key=key), prefix=key)

    report = health.report()

    assert report.limits is not None
    assert [(item.key, item.waiting) for item in report.limits.concurrency] == [
        ("b", 3), ("c", 2)]
    other = report.limits.other_concurrency
    assert (other.keys, other.running, other.waiting) == (2, 2, 1)
    assert [(item.key, item.waiting) for item in report.limits.rate] == [("r3", 3), ("r2", 2)]
    assert (report.limits.other_rate.keys, report.limits.other_rate.waiting) == (1, 1)


def test_the_limits_are_read_in_a_bounded_number_of_queries(django_assert_max_num_queries):
    for index in range(30):
        claim_all(limited(2, key=f"key{index}", limit=1), prefix=f"c{index}-")
        claim_all(rated(2, key=f"rate{index}"), prefix=f"r{index}-")
    report = health.HealthReport(generated_at=timezone.now())

    with django_assert_max_num_queries(4):  # two groupings, the others' sums, the stuck keys
        health._check_limits(report)

    assert report.limits is not None
    assert len(report.limits.concurrency) == health.KEYS_SHOWN
    assert report.limits.other_concurrency.keys == 30 - health.KEYS_SHOWN


def test_a_wait_for_a_free_slot_longer_than_three_sweeps_is_a_warning():
    bound = health.stuck_wait_after()
    assert bound == 3 * app_settings.SWEEP_INTERVAL + 30
    stuck = limited(3, key="stuck", limit=2)
    claims = claim_all(stuck)
    assert ledger.record_success(str(stuck[0].pk), claims[0])  # died before waking anyone
    waited_since(stuck[2], bound + 60)
    recent = limited(2, key="recent", limit=1)  # a slot freed a moment ago: no warning yet
    claims = claim_all(recent, prefix="r")
    assert ledger.record_success(str(recent[0].pk), claims[0])
    full = limited(2, key="full", limit=1)  # waits long, but no slot is free
    claim_all(full, prefix="f")
    waited_since(full[1], bound + 600)

    report = health.report()

    assert [(item.key, item.free, item.running, item.waiting) for item in report.stuck_waits] \
        == [("stuck", 1, 1, 1)]
    messages = [problem.message for problem in report.problems if problem.topic == "limits"]
    assert len(messages) == 1
    assert "'stuck'" in messages[0] and "1 of its 2 are free" in messages[0]
    assert f"more than the {bound:g} s" in messages[0]
    assert json.loads(json.dumps(report.as_dict()))["stuck_waits"][0]["key"] == "stuck"


def test_a_woken_task_holds_its_slot_so_its_key_is_not_stuck():
    rows = limited(3, key="k", limit=1)
    claims = claim_all(rows)
    assert ledger.record_success(str(rows[0].pk), claims[0])
    limits.wake("k")  # rows[1] holds the slot; rows[2] waits behind it
    waited_since(rows[2], health.stuck_wait_after() + 60)

    assert health.report().stuck_waits == []


def test_the_oldest_waiter_s_limit_decides_whether_a_slot_is_free():
    rows = limited(2, key="k", limit=1)
    claim_all(rows)  # rows[1] waits: the key's one slot is taken
    wider = limited(1, key="k", limit=3)[0]
    assert claim(wider, "w9").won  # its own limit of 3 leaves it a slot
    waited_since(rows[1], health.stuck_wait_after() + 60)

    assert health.report().stuck_waits == []
    assert limits.wake("k") == []  # as the wake-up sees it: no slot for the oldest waiter


def test_the_sweeper_s_wake_up_clears_the_warning(redis_server):
    rows = limited(2, key="k", limit=1)
    claims = claim_all(rows)
    assert ledger.record_success(str(rows[0].pk), claims[0])
    waited_since(rows[1], health.stuck_wait_after() + 60)
    assert [item.key for item in health.report().stuck_waits] == ["k"]

    assert sweep().woken_for_concurrency == 1

    report = health.report()
    assert report.stuck_waits == []
    assert not [problem for problem in report.problems if problem.topic == "limits"]


def test_the_report_s_json_holds_the_keys():
    claim_all(limited(2, key="exports", limit=1))
    claim_all(rated(2), prefix="r")

    data = json.loads(json.dumps(health.report().as_dict()))

    assert data["limits"]["concurrency"][0]["key"] == "exports"
    assert data["limits"]["concurrency"][0]["running"] == 1
    assert data["limits"]["rate"][0]["key"] == "api"
    assert data["limits"]["rate"][0]["next_at"].startswith(str(timezone.now().year))


def test_the_health_page_shows_the_keys_and_links_their_waiting_tasks(root, monkeypatch):
    monkeypatch.setattr(health, "KEYS_SHOWN", 1)
    claim_all(limited(3, key="exports/eu&1", limit=1))
    claim_all(limited(1, key="imports", limit=1), prefix="i")
    claim_all(rated(2), prefix="r")
    claim_all(rated(2, key="mail"), prefix="m")

    content = root.get(HEALTH).content.decode()

    table = content[content.index('id="rt-concurrency-keys"'):]
    table = table[:table.index("</table>")]
    assert (f'href="{CHANGELIST}?concurrency_key=exports%2Feu%261&amp;state__exact=WAITING"'
            in table)
    assert "<td>1</td><td>1</td><td>0</td><td>2</td>" in table  # limit, running, woken, waiting
    assert "And 1 other concurrency key: 1 running, 0 waiting." in content
    rates = content[content.index('id="rt-rate-keys"'):]
    assert f'href="{CHANGELIST}?rate_key=api&amp;state__exact=WAITING"' in rates
    assert "And 1 other rate key: 1 waiting." in content


def test_the_health_page_says_when_no_task_is_limited(root):
    dispatch(add, (1, 1))

    assert "No task runs under a concurrency limit or waits for a limit." in page(root, HEALTH)


# --- metrics ---------------------------------------------------------------------------------


def scrape(top_keys: int = 20) -> CollectorRegistry:
    return registry(LedgerCollector(observations=False, top_keys=top_keys))


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_running_and_waiting_tasks_are_gauges_per_key_and_reason():
    claim_all(limited(5, key="exports", limit=2))
    claim_all(rated(3), prefix="r")

    reg = scrape()

    assert sample(reg, "reliable_tasks_limit_running", key="exports") == 2
    assert sample(reg, "reliable_tasks_limit_waiting", key="exports", reason="concurrency") == 3
    assert sample(reg, "reliable_tasks_limit_waiting", key="api", reason="rate") == 2
    assert sample(reg, "reliable_tasks_limit_running", key="api") is None
    assert sample(reg, "reliable_tasks_limit_running", key="other") is None  # nothing left out


def test_deferrals_are_summed_per_task_over_the_rows_kept():
    rows = limited(3, key="exports", limit=1)
    claims = claim_all(rows)
    claim(rows[2], "again")  # a second deferral of the same task
    assert ledger.record_success(str(rows[0].pk), claims[0])  # finished rows still count

    reg = scrape()

    assert sample(reg, "reliable_tasks_limit_deferrals", task="demo.add") == 3


def test_keys_past_the_top_are_summed_under_other_and_a_key_named_other_joins_them():
    for key, waiting in (("a", 1), ("b", 3), ("other", 4), ("c", 2)):
        claim_all(limited(waiting + 1, key=key, limit=1), prefix=key)
    for key, waiting in (("r1", 1), ("r2", 2), ("r3", 3)):
        claim_all(rated(waiting + 1, key=key), prefix=key)

    reg = scrape(top_keys=2)

    waiting = {(s.labels["key"], s.labels["reason"]): s.value
               for family in reg.collect() if family.name == "reliable_tasks_limit_waiting"
               for s in family.samples}
    assert waiting == {("b", "concurrency"): 3, ("c", "concurrency"): 2,
                       ("other", "concurrency"): 5, ("r3", "rate"): 3, ("r2", "rate"): 2,
                       ("other", "rate"): 1}
    assert sample(reg, "reliable_tasks_limit_running", key="other") == 2


def test_the_load_is_read_in_a_bounded_number_of_queries(django_assert_max_num_queries):
    for index in range(30):
        claim_all(limited(2, key=f"key{index}", limit=1), prefix=f"c{index}-")
        claim_all(rated(2, key=f"rate{index}"), prefix=f"r{index}-")

    with django_assert_max_num_queries(3):
        load = limit_load(5)

    assert len(load.concurrency) == len(load.rate) == 5
    assert (load.other_concurrency.keys, load.other_concurrency.waiting) == (25, 25)
    assert (load.other_rate.keys, load.other_rate.waiting) == (25, 25)


@pytest.mark.parametrize("top", [-1, 1.5, True, "5"])
def test_a_number_of_keys_that_is_not_a_count_is_refused(top):
    with pytest.raises(ValueError, match="top_keys must be an integer of 0 or more"):
        LedgerCollector(top_keys=top)


def test_a_negative_number_of_keys_to_list_is_refused():
    with pytest.raises(ValueError, match="top must be 0 or more, not -1"):
        limit_load(-1)
