"""The Dagster and MLflow UIs, driven in headless Chromium (Playwright).

One tiny synthetic screen, one `dagster dev` (webserver + daemon) and one `mlflow ui` are shared by the
whole module. The lineage page must show every asset; a backfill of every plate launched from the UI
must complete and fill the catalog; MLflow's model registry must list both encoders.

Needs Playwright (dev dependency) and a Chromium binary (Debian: `apt-get install -y chromium`);
skipped without them. Run with `uv run --frozen pytest -m browser tests/test_ui_browser.py`.
Set `BIOEMBED_SCREENSHOT_DIR` to keep the screenshots somewhere other than pytest's temp folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import TINY_SCREEN

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1800)]

ASSETS = ["raw_plate", "platemap", "illumination", "segmentation", "crops", "encoder/classical", "encoder/ca_mae",
          "embeddings/classical", "embeddings/ca_mae", "challenger/ca_mae", "well_profiles", "normalizer",
          "normalized_profiles", "evaluation", "encoder_comparison", "imported_profiles", "imported_evaluation"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Wide enough that the fitted lineage graph is drawn at a scale >= 0.6, where Dagster draws full asset
# nodes (below that it draws "minimal" nodes with middle-truncated names such as "normaliz…_profiles").
LINEAGE_VIEWPORT = {"width": 3840, "height": 1800}
SERVER_START_TIMEOUT_S = 240
BACKFILL_TIMEOUT_S = 1200  # 2 plates: 6m40s on 2 idle cores, >15 min on 2 busy ones (daemon ticks every 30 s)


# -- processes ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_script(name: str) -> str:
    script = Path(sys.executable).with_name(name)
    found = str(script) if script.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"`{name}` is not installed next to {sys.executable}")
    return found


def _default_signals() -> None:
    # A process started from a background job inherits SIGINT/SIGTERM as ignored (STACK.md): restore them.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def wait_until_up(self, path: str, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"{self.name} did not answer {self.url + path} within {timeout_s} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM to the whole process group: the server and everything it started."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """`terminate`, up to 30 s to exit, then SIGKILL to what is left of the group."""
        self.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers (e.g. run workers) of the group
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


def _start(name: str, cmd: list[str], env: dict[str, str], log: Path, url: str) -> Server:
    handle = log.open("w")
    process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                               preexec_fn=_default_signals)
    handle.close()
    return Server(name, url, process, log)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (uv sync --group dev)")
    path = os.environ.get("BIOEMBED_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not path:
        pytest.skip("no Chromium binary (apt-get install -y chromium, or set BIOEMBED_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path: str):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
    except PlaywrightError as err:
        playwright.stop()
        pytest.skip(f"Chromium at {chromium_path} does not start: {err}")
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("BIOEMBED_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory: pytest.TempPathFactory, chromium_path: str):
    """A tiny synthetic screen whose plates are registered as partitions (nothing materialized)."""
    import dagster as dg

    from bioembed_assets.sources.synthetic import generate_screen
    from dagster_project.demo import use_home
    from dagster_project.partitions import plates

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    try:
        home = use_home(tmp_path_factory.mktemp("ui-home"))
        names = generate_screen(home.raw_root, TINY_SCREEN)
        # registered up front, so the sensor finds nothing new and the backfill alone runs the plates
        with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
            instance.add_dynamic_partitions(plates.name, names)
        yield home, names
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def servers(ui_home) -> Iterator[dict[str, Server]]:
    """`dagster dev` and `mlflow ui` on the home, started together (their start-ups overlap). MLflow
    creates its database before any Dagster run opens it."""
    home, _ = ui_home
    env = {**os.environ, "DAGSTER_HOME": str(home.dagster_home), "BIOEMBED_HOME": str(home.root),
           "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MPLCONFIGDIR": str(home.matplotlib_config)}
    port, mlflow_port = _free_port(), _free_port()
    env["BIOEMBED_MLFLOW_UI_URL"] = f"http://127.0.0.1:{mlflow_port}"  # asset pages link to this MLflow UI
    started: dict[str, Server] = {}
    try:
        started["dagster"] = _start(
            "dagster dev",
            [_venv_script("dagster"), "dev", "-m", "dagster_project.definitions", "-p", str(port), "-h", "127.0.0.1"],
            env, home.root / "dagster-dev.log", f"http://127.0.0.1:{port}")
        started["mlflow"] = _start(
            "mlflow ui",
            [_venv_script("mlflow"), "ui", "--backend-store-uri", home.mlflow_tracking_uri,
             "--default-artifact-root", str(home.mlflow_artifacts), "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1"],
            env, home.root / "mlflow-ui.log", f"http://127.0.0.1:{mlflow_port}")
        started["mlflow"].wait_until_up("/health")
        started["dagster"].wait_until_up("/server_info")
        yield started
    finally:
        for server in started.values():
            server.terminate()  # both shut down at once
        for server in started.values():
            server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=LINEAGE_VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


# -- Dagster --------------------------------------------------------------------------------------
def _open_lineage(page, dagster_url: str) -> None:
    """The global lineage page, with the first-visit community modal skipped and every group expanded."""
    page.goto(f"{dagster_url}/asset-groups", wait_until="load")
    materialize_all = page.get_by_role("button", name="Materialize all…")
    materialize_all.wait_for(timeout=60_000)
    skip = page.get_by_role("button", name="Skip", exact=True)
    try:
        skip.wait_for(timeout=3_000)
        skip.click()
        skip.wait_for(state="hidden")
    except Exception:  # the modal is shown only on the instance's first visit
        pass
    asset_name = page.get_by_text("raw_plate", exact=True)
    if not asset_name.is_visible():  # groups start collapsed
        page.keyboard.press("Alt+e")  # "Expand all groups"
    asset_name.wait_for()


def test_lineage_shows_every_asset(page, servers, screenshots: Path) -> None:
    _open_lineage(page, servers["dagster"].url)
    try:  # the expanded graph may take a moment to lay out on a loaded machine
        page.get_by_text("normalized_profiles", exact=True).wait_for(timeout=60_000)
    except Exception:
        pytest.fail("the lineage graph is drawn with minimal (name-truncated) nodes: widen LINEAGE_VIEWPORT")
    page.wait_for_timeout(2_000)  # let the layout settle before measuring positions
    viewport = page.viewport_size
    # Dagster labels a node with the last part of its key: encoder/ca_mae, embeddings/ca_mae and
    # challenger/ca_mae are three nodes labelled "ca_mae".
    labels = Counter(name.rsplit("/", 1)[-1] for name in ASSETS)
    for label, expected in labels.items():
        nodes = page.get_by_text(label, exact=True)
        nodes.first.wait_for(timeout=30_000)
        assert nodes.count() == expected, f"{nodes.count()} nodes labelled {label}, expected {expected}"
        for i in range(expected):
            node = nodes.nth(i)
            assert node.is_visible(), f"a node labelled {label} is not visible"
            box = node.bounding_box()
            assert box and 0 <= box["x"] and box["x"] + box["width"] <= viewport["width"] \
                and 0 <= box["y"] and box["y"] + box["height"] <= viewport["height"], f"{label} is off screen: {box}"
    for group in ("ingest", "embed", "profile", "evaluate", "learn"):
        assert page.get_by_text(group, exact=True).first.is_visible()
    page.screenshot(path=screenshots / "dagster-lineage.png")


def _backfill_report(instance, backfill_id: str) -> str:
    """Why a backfill did not succeed: the daemon's error and each failed run's step failures."""
    import dagster as dg

    backfill = instance.get_backfill(backfill_id)
    lines = [f"backfill {backfill_id}: {backfill.status if backfill else 'missing'}"]
    if backfill and backfill.error:
        lines.append(f"daemon error: {backfill.error.to_string()}")
    for record in instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})):
        run = record.dagster_run
        assets = sorted(k.to_user_string() for k in run.asset_selection or [])
        lines.append(f"run {run.run_id[:8]} {run.status.value} {assets} {run.tags.get('dagster/partition', '')}")
        if run.status == dg.DagsterRunStatus.FAILURE:
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event and event.event_type in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE):
                    lines.append(f"    {event.event_type.value} {event.step_key or ''}: {event.message}")
                    error = event.step_failure_data.error if event.is_step_failure else None
                    if error:
                        lines.append("    " + error.to_string()[-2000:])
    return "\n".join(lines)


def test_backfill_of_every_plate_from_the_ui(page, servers, ui_home, screenshots: Path) -> None:
    import dagster as dg

    from bioembed_assets.store.catalog import connect

    home, plate_names = ui_home
    dagster = servers["dagster"]
    _open_lineage(page, dagster.url)
    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Launch runs to materialize {len(ASSETS)} assets").wait_for()
    dialog.get_by_role("button", name="All", exact=True).click()
    dialog.get_by_text(f"{len(plate_names)} partitions", exact=True).wait_for()
    for plate in plate_names:
        assert dialog.get_by_text(plate, exact=True).first.is_visible()
    dialog.get_by_role("button", name="Launch backfill").click()
    created = page.get_by_text(re.compile(r"^Created backfill \w+$"))
    created.wait_for()
    backfill_id = created.inner_text().split()[-1]
    page.goto("about:blank")  # an open Dagster page polls the webserver every 2 s: spare the CPU meanwhile

    terminal = {"COMPLETED_SUCCESS", "COMPLETED_FAILED", "COMPLETED", "FAILED", "CANCELED"}  # BulkActionStatus
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        deadline, status = time.monotonic() + BACKFILL_TIMEOUT_S, None
        while time.monotonic() < deadline and dagster.process.poll() is None:
            status = instance.get_backfill(backfill_id).status.value
            if status in terminal:
                break
            time.sleep(5)
        report = _backfill_report(instance, backfill_id)
    assert status == "COMPLETED_SUCCESS", \
        f"{report}\n--- dagster dev log ---\n{dagster.log_tail()}"

    page.goto(f"{dagster.url}/runs/b/{backfill_id}", wait_until="load")
    page.get_by_text("Succeeded", exact=True).first.wait_for()
    page.get_by_text("normalized_profiles", exact=True).first.wait_for()
    page.screenshot(path=screenshots / "dagster-backfill.png", full_page=True)

    with connect(home.catalog_path) as con:
        profiled = dict(con.sql("SELECT plate, count(*) FROM normalized_profiles GROUP BY plate").fetchall())
        metric_rows = dict(con.sql("SELECT encoder, count(*) FROM metrics GROUP BY encoder").fetchall())
    assert sorted(profiled) == sorted(plate_names) and all(n > 0 for n in profiled.values()), profiled
    assert {"classical", "ca_mae"} <= set(metric_rows) and all(n > 0 for n in metric_rows.values()), metric_rows

    _evaluation_page_shows_tables_numbers_and_mlflow_links(page, servers, screenshots)
    _checks_tab_describes_checks(page, dagster.url, screenshots)
    _run_log_shows_info_progress(page, dagster.url, home, backfill_id, screenshots)


PROGRESS = re.compile(r"\d+ of \d+ \(\d+%\), \d+/s$")
"""An INFO progress line of a step (`dagster_project.assets.info_progress`): "<what>: done of total (pct), rate/s"."""
THROUGHPUT = re.compile(r"\d+ \w+ in [\d.]+ s \([\d.]+ \w+/s\)$")
"""A step's INFO throughput line (`log_throughput`): "<what>: N fields in S s (R fields/s)"."""


def _run_log_shows_info_progress(page, dagster_url: str, home, backfill_id: str, screenshots: Path) -> None:
    """A backfill run's log holds INFO progress lines (embedding: crops done of total, rate) and each
    ingest step's throughput; the run page shows the progress line."""
    import logging

    import dagster as dg

    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        progress: dict[str, tuple[str, str]] = {}  # run id -> (step, last progress line of its raw_plate step)
        throughput = set()
        for record in instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})):
            for entry in instance.all_logs(record.dagster_run.run_id):
                if entry.level == logging.INFO and entry.user_message and not entry.dagster_event:
                    if PROGRESS.search(entry.user_message) and entry.step_key == "raw_plate":
                        progress[record.dagster_run.run_id] = (entry.step_key, entry.user_message)
                    if THROUGHPUT.search(entry.user_message):
                        throughput.add(entry.step_key)
    assert progress, "no run logged INFO progress for its raw_plate step"
    assert {"raw_plate", "segmentation", "crops"} <= throughput, throughput
    run_id, (step, line) = next(iter(progress.items()))
    # the run page's own log filter (URL state of the UI's filter box): that step's INFO lines only
    page.goto(f"{dagster_url}/runs/{run_id}?logs=step%3A{step}&hideNonMatches=true&levels=info", wait_until="load")
    page.get_by_text(line.split(": ")[-1], exact=False).first.wait_for(timeout=60_000)
    page.screenshot(path=screenshots / "dagster-run-progress.png", full_page=True)


def _evaluation_page_shows_tables_numbers_and_mlflow_links(page, servers, screenshots: Path) -> None:
    """The metrics as a table and the headline metrics as numbers, with nothing to click; the link to
    an MLflow evaluation run opens that run, which names the Dagster run that logged it."""
    page.goto(f"{servers['dagster'].url}/assets/evaluation?view=events", wait_until="load")
    page.get_by_text("ca_mae_metrics", exact=True).first.wait_for(timeout=60_000)
    page.locator("td", has_text=re.compile(r"^replicate_map$")).first.wait_for()  # a table cell, drawn inline
    headline = page.locator("tr", has=page.get_by_text("ca_mae_card/replicate_map", exact=True)).first
    headline.wait_for()
    assert re.search(r"\d\.\d", headline.inner_text()), headline.inner_text()
    page.screenshot(path=screenshots / "dagster-evaluation.png", full_page=True)
    link = page.locator("tr", has=page.get_by_text("ca_mae_card/mlflow_run", exact=True)).first.get_by_role("link")
    url = link.first.get_attribute("href")
    assert url and url.startswith(f"{servers['mlflow'].url}/#/experiments/"), url
    page.goto(url, wait_until="load")
    page.get_by_text("dagster_run_id").first.wait_for(timeout=60_000)
    page.screenshot(path=screenshots / "mlflow-evaluation-run.png", full_page=True)


def _checks_tab_describes_checks(page, dagster_url: str, screenshots: Path) -> None:
    page.goto(f"{dagster_url}/assets/crops?view=checks", wait_until="load")
    page.get_by_text("cells_per_well", exact=True).first.wait_for(timeout=60_000)
    for check, words in (("border_loss", "cells were dropped at the image border"),
                         ("cells_per_well", "Every well of the plate kept at least")):
        page.get_by_text(check, exact=True).first.click()  # the tab shows the selected check's description
        page.get_by_text(words, exact=False).first.wait_for(timeout=60_000)
    page.screenshot(path=screenshots / "dagster-crops-checks.png", full_page=True)


# -- MLflow ---------------------------------------------------------------------------------------
def _close_mlflow_dialogs(page) -> None:
    """MLflow 3.x greets with a "new model registry UI" dialog."""
    dialog = page.get_by_role("dialog")
    try:
        dialog.first.wait_for(timeout=2_000)
    except Exception:
        return
    close = dialog.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    else:
        page.keyboard.press("Escape")
    dialog.first.wait_for(state="hidden")


def test_mlflow_lists_the_registered_encoders(browser, servers, screenshots: Path) -> None:
    mlflow = servers["mlflow"]
    with urllib.request.urlopen(f"{mlflow.url}/api/2.0/mlflow/registered-models/search", timeout=30) as r:
        if not json.load(r).get("registered_models"):
            pytest.skip("no registered models yet: the backfill test (the `encoder` asset) registers them")
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        # MLflow's UI polls and never reaches "networkidle": wait for "load" plus an element
        page.goto(f"{mlflow.url}/#/models", wait_until="load")
        for name in ("ca_mae", "classical"):
            page.get_by_role("link", name=name, exact=True).wait_for()
        _close_mlflow_dialogs(page)
        for name in ("ca_mae", "classical"):
            assert page.get_by_role("link", name=name, exact=True).is_visible()
        page.screenshot(path=screenshots / "mlflow-models.png")

        page.goto(f"{mlflow.url}/#/models/ca_mae", wait_until="load")
        version_1 = page.get_by_role("row").filter(has=page.get_by_role("link", name="Version 1", exact=True))
        version_1.first.wait_for()
        _close_mlflow_dialogs(page)
        assert "champion" in version_1.first.inner_text(), "no `champion` alias on ca_mae version 1"
        page.screenshot(path=screenshots / "mlflow-ca_mae.png")
    finally:
        context.close()
