"""The admin in a real browser: an operator logs in, filters the failed tasks, opens one, clicks
Retry, and watches it succeed on a real worker.

Headless Chromium from Debian's packages (``apt-get install -y chromium chromium-driver``) driven
by Selenium through the system chromedriver: nothing is downloaded. Screenshots of each step
are kept under ``test-artifacts/`` (and one of the page a failure happened on). The
test is skipped only when Chromium or chromedriver is not installed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from example_project.demo.models import Execution
from example_project.devservers import REPO_ROOT
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
)
WAIT_SECONDS = 30

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
        reason=f"needs Chromium ({CHROMIUM}) and chromedriver ({CHROMEDRIVER}): "
               "apt-get install -y chromium chromium-driver",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, quit (with its driver) at teardown."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def operator(password: str) -> User:
    """Staff allowed to view and retry tasks, and nothing else."""
    user = User.objects.create_user("operator", password=password, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="reliable_tasks",
        codename__in=["view_taskrecord", "retry_taskrecord"]))
    return user


def failed_record(token: str) -> TaskRecord:
    """A ``demo.record`` that failed once: its retry runs the body, which succeeds."""
    now = timezone.now()
    return TaskRecord.objects.create(
        task_name="demo.record", args=[token], state=TaskState.FAILURE, attempts=1,
        max_attempts=1, worker="w-gone@host", started_at=now, finished_at=now,
        error_type="ConnectionError", error_message="the database went away",
        traceback="Traceback (most recent call last):\nConnectionError: the database went away",
        history=[{"attempt": 1, "worker": "w-gone@host", "started_at": now.isoformat(),
                  "finished_at": now.isoformat(), "outcome": "FAILURE",
                  "error": "ConnectionError: the database went away"}],
    )


def snapshot(driver: WebDriver, step: str) -> None:
    """Keep a screenshot of the page as ``test-artifacts/admin-retry-<step>.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"admin-retry-{step}.png"))


def shown_state(driver: WebDriver) -> str:
    """The state badge of the task detail page on screen."""
    badge = driver.find_element(By.CSS_SELECTOR, ".field-state_badge .rt-badge")
    return badge.get_attribute("data-state") or ""


def wait_for_state(driver: WebDriver, state: str, timeout: float = WAIT_SECONDS) -> None:
    """Reload the detail page until it shows ``state``."""
    deadline = time.monotonic() + timeout
    while shown_state(driver) != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"the page still shows {shown_state(driver)}, not {state}")
        time.sleep(0.5)
        driver.refresh()


def test_an_operator_retries_a_failed_task_from_the_browser(
        live_server, browser, redis_server, celery_worker):
    celery_worker(redis_server)
    operator(password="s3cret-pw")
    record = failed_record("browser-retry")
    TaskRecord.objects.create(task_name="demo.add", args=[1, 2], state=TaskState.SUCCESS)
    wait = WebDriverWait(browser, WAIT_SECONDS)

    try:
        browser.get(f"{live_server.url}/admin/login/?next=/admin/reliable_tasks/taskrecord/")
        browser.find_element(By.ID, "id_username").send_keys("operator")
        browser.find_element(By.ID, "id_password").send_keys("s3cret-pw")
        browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
        wait.until(EC.presence_of_element_located((By.ID, "result_list")))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 2

        browser.find_element(By.CSS_SELECTOR, "#changelist-filter").find_element(
            By.LINK_TEXT, "Failure").click()
        wait.until(EC.url_contains("state__exact=FAILURE"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        assert len(rows) == 1
        snapshot(browser, "1-failed-tasks")

        rows[0].find_element(By.LINK_TEXT, str(record.pk)[:8]).click()
        retry_button = wait.until(EC.element_to_be_clickable((By.ID, "rt-retry-button")))
        assert shown_state(browser) == TaskState.FAILURE
        snapshot(browser, "2-failed-task")
        retry_button.click()
        message = wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, ".messagelist .success")))
        assert "reset to PENDING and will run again" in message.text

        wait_for_state(browser, TaskState.SUCCESS)
        snapshot(browser, "3-succeeded")
    except BaseException:
        snapshot(browser, "failed")
        raise

    assert Execution.objects.filter(token="browser-retry").count() == 1
    assert browser.find_elements(By.ID, "rt-retry-button") == []
    history = browser.find_element(By.CSS_SELECTOR, ".field-history_table").text
    assert "manual retry" in history and "operator" in history
