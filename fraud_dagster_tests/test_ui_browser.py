"""The Dagster UI as an operator sees it, in a real browser.

`dagster dev` (webserver and daemon) runs on a free port with a temporary DAGSTER_HOME against
the test's broker, database and SMTP server; its sensor launches a batch run by itself. Once the
webserver's GraphQL reports the run finished, headless Debian Chromium visits the asset graph,
the run's page, the runs list filtered by tag and the suspicious_transactions asset page, and
checks what is written there; a second test has a batch fail and re-executes it from failure
with the run page's button. Screenshots go to docs/screenshots/ (git-ignored) for a human.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fraud_dagster.local_services.dagster_processes import start_webserver, stop_dagster_process
from fraud_dagster.local_services.process import free_port
from fraud_dagster.model import read_manifest
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import PROJECT_ROOT, Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster_tests.helpers import (
    MailBox,
    graphql,
    produce,
    produce_raw,
    suspicious_ids,
)
from fraud_dagster_tests.operations_support import (
    accounting,
    emails_by_transaction,
    require,
    tampered_models_dir,
    wait_for,
)

# SQLite only: the UI shows the Dagster instance; the pipeline's storage is tested elsewhere.
pytestmark = [
    pytest.mark.services,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.backends("sqlite"),
]

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = PROJECT_ROOT / "docs" / "screenshots"
ASSETS = (
    "transactions_topic",
    "fraud_model",
    "scored_transactions",
    "suspicious_transactions",
    "fraud_alerts",
)
JOBS = ("score_transactions", "send_pending_alerts", "reload_model", "train_model")
GOOD_MESSAGES = 300
RERUN_MESSAGES = 200
BAD_MESSAGES = 3
RUN_TIMEOUT_SECONDS = 240
UI_TIMEOUT_MS = 60_000

RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
  }
}
"""


def webserver_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture
def dagster_dev(env: dict[str, str], dagster_home: Path, tmp_path: Path) -> Iterator[str]:
    """`dagster dev` on a free port; its URL. Stopped (the whole process group) afterwards."""
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    process = start_webserver(dagster_home, env, log, port, with_daemon=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not webserver_ready(base_url):
            assert process.poll() is None, f"dagster dev exited:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"webserver not up in 180 s:\n{log_tail(log)}"
            time.sleep(1)
        # The community newsletter dialog would cover the pages: mark it seen, as "Skip" does.
        graphql(base_url, "mutation { setNuxSeen }")
        yield base_url
    finally:
        stop_dagster_process(process)


def wait_for_batch_run(base_url: str, topic: str, log: Path) -> dict:
    """The sensor's batch run of `topic`, once the webserver reports it finished."""
    variables = {"filter": {"tags": [{"key": "fraud_dagster/topic", "value": topic}]}}
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = graphql(base_url, RUNS_QUERY, variables)["runsOrError"]["results"]
        if runs and all(run["status"] in ("SUCCESS", "FAILURE", "CANCELED") for run in runs):
            break
        time.sleep(2)
    assert len(runs) == 1, f"expected one batch run, got {runs}:\n{log_tail(log)}"
    assert runs[0]["status"] == "SUCCESS", f"{runs[0]}\n{log_tail(log)}"
    return runs[0]


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def assert_entry(text: str, key: str, value: object) -> None:
    """`key` followed by `value` in the visible text (a metadata table row, a tag)."""
    pattern = rf"(?<![\w/]){re.escape(key)}:? {re.escape(str(value))}(?![\w.])"
    assert re.search(pattern, normalized(text)), f"{key} = {value} not shown"


def metadata_value(page: Any, key: str) -> Any:
    """The value cell of row `key` of the asset page's metadata table (key, timestamp, value)."""
    key_cell = page.locator("td", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))
    return page.locator("tr").filter(has=key_cell).first.locator("td").last


@contextmanager
def operator_browser() -> Iterator[tuple[Any, Callable[[str], None]]]:
    """A page of headless Debian Chromium and a function that screenshots it into
    docs/screenshots/; a failing test leaves failure.png there."""
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "failure.png").unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)

        def shot(name: str) -> None:
            page.screenshot(
                path=str(SCREENSHOTS / f"{name}.png"), full_page=True, animations="disabled"
            )

        try:
            yield page, shot
        except Exception:
            shot("failure")
            raise
        finally:
            browser.close()


@pytest.fixture
def chromium() -> Path:
    """Debian's chromium: the test skips without it, or fails under CI (`require`)."""
    require(CHROMIUM.exists(), "needs Debian chromium (scripts/setup.sh)")
    return CHROMIUM


@pytest.fixture
def one_batch_waiting(settings: Settings) -> int:
    """GOOD_MESSAGES transactions, then BAD_MESSAGES cut off, on the topic before `dagster dev`
    starts (request this fixture before `dagster_dev`): the sensor's first tick finds them all,
    one batch. Sent while the sensor ran, a tick between the two sends split them into two
    runs. Returns the last offset."""
    produce(settings, to_messages(synthetic_transactions(GOOD_MESSAGES, seed=17)))
    produce_raw(settings, [b'{"transaction_id": "cut off'] * BAD_MESSAGES)
    return GOOD_MESSAGES + BAD_MESSAGES - 1


@pytest.mark.usefixtures("chromium")  # before the services start
def test_operator_sees_lineage_run_tags_metadata_and_checks(
    settings: Settings, one_batch_waiting: int, dagster_dev: str, database_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    last = one_batch_waiting
    run = wait_for_batch_run(dagster_dev, settings.kafka_topic, tmp_path / "dagster_dev.log")
    run_id, short_id = run["runId"], run["runId"][:8]
    suspicious = len(suspicious_ids(database_url))
    manifest = read_manifest(settings.models_dir)
    version = manifest.default_version or manifest.newest().version

    with operator_browser() as (page, shot):
        # Lineage: every asset in the graph, both batch assets with their checks passed.
        page.goto(f"{dagster_dev}/asset-groups")
        for name in ASSETS:
            expect(page.get_by_text(name, exact=True).last).to_be_visible()
        expect(page.get_by_text("2 / 2 Passed")).to_have_count(2)  # two checks on each
        shot("01-asset-graph")

        # What the batch's metadata says wherever it is shown.
        batch_entries = (
            ("topic", settings.kafka_topic),
            ("partition", 0),
            ("first_offset", 0),
            ("last_offset", last),
            ("model_version", version),
            ("scored", GOOD_MESSAGES),
            ("suspicious", suspicious),
        )
        # The batch run: what it materialized, with the batch's figures.
        page.goto(f"{dagster_dev}/runs/{run_id}?logs=type:ASSET_MATERIALIZATION")
        expect(page.get_by_text("Materialized value scored_transactions.")).to_be_visible()
        expect(page.get_by_text("Materialized value fraud_alerts.")).to_be_visible()
        expect(page.get_by_text("4 checks")).to_be_visible()
        expect(page.get_by_text("Succeeded (7)")).to_be_visible()  # the seven steps
        text = page.inner_text("body")
        for key, value in (
            *batch_entries,
            ("read", GOOD_MESSAGES + BAD_MESSAGES),
            ("rejected", BAD_MESSAGES),
            ("alerted", suspicious),
        ):
            assert_entry(text, key, value)
        for key in ("batch_latency_seconds", "score_histogram", "fraud_probability"):
            assert key in text
        page.wait_for_load_state("networkidle")
        shot("02-run-materializations")
        page.get_by_text("View full message").first.click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("batch_latency_seconds")).to_be_visible()
        expect(dialog.get_by_text("0.0-0.1", exact=True)).to_be_visible()
        shot("03-run-scored-transactions-metadata")
        dialog.get_by_role("button", name="Done").click()
        expect(dialog).to_have_count(0)

        # Its tags: topic, partition and offset range.
        page.get_by_text("View tags and config").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("fraud_dagster/offset_range")).to_be_visible()
        tags = dialog.inner_text()
        assert_entry(tags, "fraud_dagster/topic", settings.kafka_topic)
        assert_entry(tags, "fraud_dagster/partition", 0)
        assert_entry(tags, "fraud_dagster/offset_range", f"0-{last}")
        assert_entry(tags, "fraud_dagster/topic_partition", f"{settings.kafka_topic}/0")
        shot("04-run-tags")
        dialog.get_by_role("button", name="OK").click()

        # Run history filtered by a tag: this run for its offset range, none for partition 1.
        query = urllib.parse.urlencode({"q[0]": f"tag:fraud_dagster/offset_range=0-{last}"})
        page.goto(f"{dagster_dev}/runs?{query}")
        expect(page.get_by_role("link", name=short_id)).to_be_visible()
        shot("05-runs-filtered-by-tag")
        query = urllib.parse.urlencode({"q[0]": "tag:fraud_dagster/partition=1"})
        page.goto(f"{dagster_dev}/runs?{query}")
        expect(page.get_by_text("No matching runs")).to_be_visible()
        expect(page.get_by_role("link", name=short_id)).to_have_count(0)

        # The analysts' queue: description, the batch's metadata, the checks.
        page.goto(f"{dagster_dev}/assets/suspicious_transactions")
        expect(page.get_by_text("the risk analysts' queue", exact=False)).to_be_visible()
        for key, value in batch_entries:
            expect(metadata_value(page, key)).to_have_text(str(value))
        shot("06-suspicious-transactions")

        page.goto(f"{dagster_dev}/assets/suspicious_transactions?view=checks")
        expect(page.get_by_text("model_file_verified").first).to_be_visible()
        expect(page.get_by_text("score_drift").first).to_be_visible()
        page.get_by_text("score_drift").first.click()
        expect(page.get_by_text("held_out_share")).to_be_visible()
        text = normalized(page.inner_text("body"))
        assert re.search(r"psi \d\.\d+", text), "the PSI is not shown"
        assert "Passed" in text
        shot("07-suspicious-transactions-checks")

        # Jobs, the model's life cycle included, each with its description.
        page.goto(f"{dagster_dev}/jobs")
        for name in JOBS:
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        shot("08-jobs")

        # Resources: the class docstring and each field's description.
        page.goto(f"{dagster_dev}/locations/fraud_dagster/resources/batch_checks")
        expect(page.get_by_text("Limits of the asset checks every batch run")).to_be_visible()
        expect(page.get_by_text("FRAUD_CHECK_MAX_SCORE_PSI", exact=False)).to_be_visible()
        shot("09-resource-batch-checks")


@pytest.fixture
def damaged_model(env: dict[str, str], tmp_path: Path) -> Path:
    """The models directory `dagster dev` will load, its files changed after publication
    (requested before `dagster_dev`, which starts with `env`)."""
    models = tampered_models_dir(PROJECT_ROOT / "models", tmp_path / "models")
    env["FRAUD_MODELS_DIR"] = str(models)
    return models


def batch_runs(base_url: str, topic: str) -> list[dict]:
    """The runs of `topic`, newest first, as the webserver reports them."""
    variables = {"filter": {"tags": [{"key": "fraud_dagster/topic", "value": topic}]}}
    return graphql(base_url, RUNS_QUERY, variables)["runsOrError"]["results"]


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


@pytest.mark.usefixtures("chromium")
def test_operator_reruns_a_failed_batch_from_its_run_page(
    damaged_model: Path,
    settings: Settings,
    dagster_dev: str,
    database_url: str,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    """At night: a batch failed (the model file was damaged), and so did Dagster's two
    automatic retries. The operator restores the file and clicks "Re-execute from failure" on
    the last failed run's page: the batch is stored once and each alert sent once."""
    from playwright.sync_api import expect

    log = tmp_path / "dagster_dev.log"
    produce(settings, to_messages(synthetic_transactions(RERUN_MESSAGES, seed=29)))
    failed: list[dict] = []

    def all_attempts_failed() -> bool:
        nonlocal failed
        failed = batch_runs(dagster_dev, settings.kafka_topic)
        return len(failed) == 3 and all(run["status"] == "FAILURE" for run in failed)

    wait_for(all_attempts_failed, RUN_TIMEOUT_SECONDS, f"three failed attempts\n{log_tail(log)}")
    last_failed = failed[0]  # newest first: the second retry
    assert tag(last_failed, "dagster/retry_number") == "2"
    assert sum(accounting(database_url, settings.kafka_topic).values()) == 0
    for path in damaged_model.glob("*.joblib"):  # the operator restores the published files
        shutil.copyfile(PROJECT_ROOT / "models" / path.name, path)

    with operator_browser() as (page, shot):
        page.goto(f"{dagster_dev}/runs/{last_failed['runId']}")
        expect(page.get_by_text("ModelIntegrityError").first).to_be_visible()
        rerun_button = page.get_by_role("button", name=re.compile("From failure"))
        expect(rerun_button).to_be_enabled()
        shot("10-failed-batch-run")
        rerun_button.click()
        page.wait_for_url(re.compile(r"/runs/(?!" + last_failed["runId"] + r")[0-9a-f-]{36}"))
        rerun_id = page.url.rsplit("/runs/", 1)[1].split("?")[0]

        def rerun_finished() -> bool:
            runs = {run["runId"]: run for run in batch_runs(dagster_dev, settings.kafka_topic)}
            return runs.get(rerun_id, {}).get("status") in ("SUCCESS", "FAILURE", "CANCELED")

        wait_for(rerun_finished, RUN_TIMEOUT_SECONDS, f"the rerun finishing\n{log_tail(log)}")
        page.goto(f"{dagster_dev}/runs/{rerun_id}?logs=type:ASSET_MATERIALIZATION")
        expect(page.get_by_text("Materialized value scored_transactions.")).to_be_visible()
        expect(page.get_by_text("Materialized value fraud_alerts.")).to_be_visible()
        shot("11-rerun-from-failure")

    rerun = {run["runId"]: run for run in batch_runs(dagster_dev, settings.kafka_topic)}[rerun_id]
    assert rerun["status"] == "SUCCESS", f"{rerun}\n{log_tail(log)}"
    assert tag(rerun, "dagster/parent_run_id") == last_failed["runId"]
    assert tag(rerun, "fraud_dagster/offset_range") == f"0-{RERUN_MESSAGES - 1}"
    assert accounting(database_url, settings.kafka_topic) == {
        (0, offset): 1 for offset in range(RERUN_MESSAGES)
    }
    suspicious = suspicious_ids(database_url)
    assert suspicious

    def alerts() -> list:  # the operators' failure emails go to the same server
        return [m for m in mailbox.messages() if m["X-Fraud-Transaction-Id"]]

    wait_for(lambda: len(alerts()) >= len(suspicious), 30, "the alert emails")
    assert emails_by_transaction(alerts()) == dict.fromkeys(suspicious, 1)
