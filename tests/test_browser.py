"""The MLflow and Prefect UIs of a finished run, checked in a real browser (Debian's Chromium,
headless, driven by Selenium through the system ``chromedriver``; the Makefile's system step
installs both as it installs the data packages).

The session's finished front flow (``reference_run``, on the session's Prefect server, which
serves its UI on 127.0.0.1), then ``varmerge ui`` on the run's tracking store. The test opens
what a user opens and waits for what they should see: the runs and the nested runs in MLflow's
model-training view, the front image, the front table, the registered model version; the flow
run and its task runs in Prefect. Then SIGTERM stops ``varmerge ui`` with its server and the
server's workers. Screenshots go to the test's temp folder (``<tmp>/screens``).
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from servers import Procs, free_port, stops_its_group, tail, wait_healthy

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("reference"),  # the session's reference run: built once per worker
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="needs Debian's chromium and chromium-driver (make setup installs them as root)",
    ),
]
BIN = Path(sys.executable).parent


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Browser:
    def __init__(self, screens: Path):
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        self.screens = screens
        screens.mkdir()

    def page(self, name: str, url: str, *texts: str, timeout: float = 60) -> str:
        """Open ``url`` and wait until the page's text holds every one of ``texts``; screenshot."""
        self.driver.get(url)
        return self.shows(name, *texts, timeout=timeout)

    def shows(self, name: str, *texts: str, timeout: float = 60) -> str:
        """Wait until the page's text holds every one of ``texts``; screenshot."""
        deadline, body = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            body = self.driver.find_element("tag name", "body").text
            if all(t in body for t in texts):
                break
            time.sleep(0.5)
        self.driver.save_screenshot(str(self.screens / f"{name}.png"))
        missing = [t for t in texts if t not in body]
        assert not missing, f"{name}: {missing} not shown at {self.driver.current_url}; the page says:\n{body[:3000]}"
        return body

    def click_text(self, text: str) -> None:
        """Click the innermost element whose whole text is ``text`` (a tab, a file in a tree)."""
        script = (
            "const all = Array.from(document.querySelectorAll('body *'))"
            ".filter(e => e.offsetParent !== null && (e.innerText || '').trim() === arguments[0]);"
            "const inner = all.filter(e => !all.some(o => o !== e && e.contains(o)));"
            "if (inner.length) { inner[0].click(); return true; } return false;"
        )
        assert self.driver.execute_script(script, text), f"nothing to click reads {text!r} at {self.driver.current_url}"

    def wait_for(self, name: str, script: str, timeout: float = 30):
        """Wait until ``script`` (JavaScript returning a value) is truthy; screenshot."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline and not value:
            value = self.driver.execute_script(script)
            time.sleep(0.0 if value else 0.5)
        self.driver.save_screenshot(str(self.screens / f"{name}.png"))
        assert value, f"{name}: {script} stayed false"
        return value


def test_the_mlflow_and_prefect_uis_show_a_finished_run(reference_run, prefect_server, tmp_path):
    import mlflow

    ui_port, uri, name = free_port(), reference_run["uri"], reference_run["summary"]["config"]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(logs)
    browser = None
    try:
        ui = procs.start("ui", [str(BIN / "varmerge"), "ui", "--tracking-uri", uri, "--port", str(ui_port)])
        wait_healthy(f"http://127.0.0.1:{ui_port}/health", ui, logs / "ui.log")

        client = mlflow.MlflowClient(uri)
        [exp] = [e for e in client.search_experiments() if e.name != "Default"]
        runs = client.search_runs([exp.experiment_id])
        [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        flow_run_id = parent.data.tags["varmerge.flow_run_id"]
        browser = Browser(tmp_path / "screens")
        mlflow_ui, view = f"http://127.0.0.1:{ui_port}/#", "workflowType=machine_learning"
        experiment = f"{mlflow_ui}/experiments/{exp.experiment_id}"

        # the runs of the experiment in the model-training view, from the link `varmerge ui` prints
        [link] = re.findall(r"varmerge: (http://\S+)", (logs / "ui.log").read_text())
        assert link == f"{experiment}/runs?{view}", link
        browser.page("runs", link, name, "Model registry", f"{len(runs)} matching runs")
        # the nested runs of the flow run, under its row once expanded
        browser.driver.find_element("css selector", ".ag-row button[data-component-id*=runnamecellrenderer]").click()
        browser.shows("nested_runs", "finetune/a", "finetune/c", "merge/mixture", "multitask/final")
        # the front image, rendered (an image of the PNG's size, loaded)
        artifacts = f"{experiment}/runs/{parent.info.run_id}/artifacts"
        browser.page("front_image_page", f"{artifacts}/front/front.png?{view}", "front/front.png")
        browser.wait_for(
            "front_image", "return Array.from(document.images).some(i => i.complete && i.naturalWidth >= 600)"
        )
        # the front table (method, α and accuracy per task, mean, on-front flag)
        browser.click_text("front_table.json")  # in the artifact tree
        browser.shows("front_table", "front/front_table.json", "mean_accuracy", "alpha/a", "pareto")
        # the registered model version, with its α and source run
        alpha = client.get_model_version(f"varmerge-{name}", "1").tags["alpha"]
        browser.page(
            "model", f"{mlflow_ui}/models/varmerge-{name}/versions/1?{view}", "Version 1", "multitask/final", alpha
        )

        # Prefect: the flow run, completed, with its task runs
        prefect_ui = prefect_server.removesuffix("/api")
        browser.page("flow_run", f"{prefect_ui}/runs/flow-run/{flow_run_id}", "varmerge-front", "Completed")
        browser.click_text("Task Runs")
        browser.shows("task_runs", "finetune-", "sweep-", "multitask-", "Completed")
        browser.click_text("Artifacts")
        browser.shows("progress_artifacts", "finetune a (multi_ivon × 2)", "merge + evaluate mixture")
        browser.driver.quit()
        browser = None

        # SIGTERM stops `varmerge ui`, its server and the server's workers (nothing outlives it)
        stops_its_group(ui, signal.SIGTERM, lambda: True)
        assert not _answers(ui_port)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- ui ---\n{tail(logs / 'ui.log', 2000)}") from None
    finally:
        if browser is not None:
            browser.driver.quit()
        procs.stop_all()
