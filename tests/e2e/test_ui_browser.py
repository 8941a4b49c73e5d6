"""The product as a person uses it: the Airflow trigger forms and the MLflow UI, in a real browser.

Headless Debian chromium (Selenium) against the session's real Airflow and
MLflow. Every step leaves a numbered screenshot in ``bench/out/ui/`` (CI keeps
that folder as an artifact); with ``SLURM_RAY_DOCS_SCREENSHOTS=1`` the two
pictures the README shows are copied to ``docs/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import ROOT
from tests.e2e.browser import AirflowUI, missing_browser
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

OUT = ROOT / "bench" / "out" / "ui"
DOCS = ROOT / "docs"
DAGS = ("rllib_train", "rllib_retrain", "rllib_sweep")


def _to_docs(shot: Path, name: str) -> None:
    if os.environ.get("SLURM_RAY_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / name)


@pytest.fixture(scope="module")
def ui(airflow: Airflow) -> Iterator[AirflowUI]:
    """A logged-in browser on the session's Airflow (the generated admin password)."""
    why = missing_browser()
    if why:
        pytest.fail(why)
    shutil.rmtree(OUT, ignore_errors=True)
    print(f"browser screenshots: {OUT}")
    browser = AirflowUI(OUT, airflow.base)
    try:
        password = json.loads((airflow.home / "passwords.json").read_text())["admin"]
        browser.login("admin", password)
        for dag_id in DAGS:
            airflow.wait_dag(dag_id)
        yield browser
    finally:
        browser.close()


def _runs(airflow: Airflow, dag_id: str) -> list[dict[str, Any]]:
    status, body = airflow.call("GET", f"/dags/{dag_id}/dagRuns?limit=100")
    assert status == 200, body
    return list(body["dag_runs"])


@pytest.mark.parametrize("dag_id", DAGS)
def test_trigger_form_accepts_its_defaults(ui: AirflowUI, dag_id: str) -> None:
    dialog = ui.open_trigger_form(dag_id)
    shot = ui.shot(f"{dag_id}-form")
    if dag_id == "rllib_train":
        _to_docs(shot, "ui-trigger-form.png")
    assert ui.invalid_fields(dialog) == {}, f"fields marked invalid with the defaults ({shot})"
    button = ui.trigger_button(dialog)
    assert button.is_enabled(), f"Trigger is disabled with the DAG's own defaults ({shot})"


def _wait_run(
    ui: AirflowUI, airflow: Airflow, dag_id: str, run_id: str, timeout: float = 900
) -> dict[str, Any]:
    """The run once it ended, polled over REST; the browser waits on a blank page
    meanwhile, since the run's Grid re-renders at a core's worth and this machine
    also hosts the cluster (a person's browser is elsewhere). Back on the run's
    page after."""
    from urllib.parse import quote

    page = ui.driver.current_url
    ui.driver.get("about:blank")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, run = airflow.call("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
            assert status == 200, run
            if run["state"] in ("success", "failed"):
                return dict(run)
            time.sleep(3)
        raise AssertionError(f"{dag_id} run {run_id} did not finish in {timeout:.0f} s")
    finally:
        ui.driver.get(page)


def _click_trigger(ui: AirflowUI, dialog: Any, dag_id: str) -> str:
    """Click Trigger; the UI opens the new run's page: its run id."""
    from urllib.parse import unquote

    ui.trigger_button(dialog).click()
    url = ui.wait(
        "the new run's page",
        lambda: "/runs/" in ui.driver.current_url and ui.driver.current_url,
        timeout=60,
    )
    return unquote(url.split("/runs/", 1)[1].split("/")[0].split("?")[0])


@pytest.fixture(scope="module")
def default_run(ui: AirflowUI, airflow: Airflow) -> dict[str, Any]:
    """rllib_train triggered from the form with every field left as it is, run to the end."""
    dialog = ui.open_trigger_form("rllib_train")
    ui.shot("train-defaults-before-trigger")
    run_id = _click_trigger(ui, dialog, "rllib_train")
    ui.shot("train-defaults-triggered")
    from slurm_ray.params import param_specs

    # The defaults stop at a return of 450 (minutes here) or after stop_minutes
    # (on a busy machine): a slow run is still a correct one.
    minutes = float(param_specs()["stop_minutes"]["default"])
    run = _wait_run(ui, airflow, "rllib_train", run_id, timeout=(minutes + 10) * 60)
    time.sleep(2)
    ui.shot("train-defaults-finished")
    return run


def test_train_triggered_with_the_defaults_succeeds(
    default_run: dict[str, Any], airflow: Airflow
) -> None:
    from slurm_ray.params import param_specs

    defaults = {name: spec["default"] for name, spec in param_specs().items()}
    assert default_run["conf"] == defaults
    states = {
        ti["task_id"]: ti["state"]
        for ti in airflow.call(
            "GET", f"/dags/rllib_train/dagRuns/{default_run['dag_run_id']}/taskInstances"
        )[1]["task_instances"]
    }
    assert default_run["state"] == "success", states


def _xcom(airflow: Airflow, dag_id: str, run_id: str, task_id: str, key: str) -> Any:
    status, body = airflow.call(
        "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
    )
    assert status == 200, body
    value = body["value"]
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def test_train_task_links_to_mlflow_and_slurm(
    ui: AirflowUI, default_run: dict[str, Any], airflow: Airflow, mlflow_server: MlflowServer
) -> None:
    run_id = default_run["dag_run_id"]
    summary = _xcom(airflow, "rllib_train", run_id, "train", "return_value")
    ui.driver.get(f"{ui.base}/dags/rllib_train/runs/{run_id}/tasks/train/details")
    links = ui.wait(
        "the train task's extra links",
        lambda: {
            a.text.strip(): a.get_attribute("href")
            for a in ui.find("a")
            if a.text.strip() in ("MLflow run", "Slurm job")
        }
        if len([a for a in ui.find("a") if a.text.strip() in ("MLflow run", "Slurm job")]) == 2
        else None,
    )
    ui.shot("train-task-extra-links")
    assert links["MLflow run"].startswith(mlflow_server.url), links
    assert links["MLflow run"].endswith(f"/runs/{summary['mlflow_run_id']}"), links
    assert f"slurm_job=local%3A{summary['job_id']}" in links["Slurm job"], links
    # The Slurm link opens this try's log, where the job's own log was streamed.
    next(a for a in ui.find("a") if a.text.strip() == "Slurm job").click()
    ui.wait(
        "the Slurm job's log lines",
        lambda: f"Slurm job {summary['job_id']} is COMPLETED" in ui.driver.page_source,
    )
    ui.shot("train-task-slurm-log")


def test_mlflow_ui_shows_the_learning_curve_and_the_champion(
    ui: AirflowUI, default_run: dict[str, Any], airflow: Airflow, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    run_id = default_run["dag_run_id"]
    summary = _xcom(airflow, "rllib_train", run_id, "train", "return_value")
    registered = _xcom(airflow, "rllib_train", run_id, "register_model", "return_value")
    mlrun = MlflowClient(mlflow_server.url).get_run(summary["mlflow_run_id"])
    base = f"{mlflow_server.url}/#/experiments/{mlrun.info.experiment_id}/runs/{mlrun.info.run_id}"
    history = MlflowClient(mlflow_server.url).get_metric_history(
        mlrun.info.run_id, "episode_return_mean"
    )
    assert len(history) >= 2, history
    ui.driver.get(f"{base}/model-metrics")
    search = ui.wait(
        "the metric search box", lambda: ui.find('input[placeholder="Search metric charts"]')
    )[0]
    search.send_keys("episode_return_mean")

    def curve() -> Any:
        for card in ui.find("[data-testid=experiment-view-compare-runs-card]"):
            if ui.find('h4[title="episode_return_mean"]', card):
                lines = ui.find("path.js-line", card)
                if lines and "Step" in card.text:
                    return lines[0].get_attribute("d")
        return None

    path = ui.wait("the episode_return_mean chart", curve)
    shot = ui.shot("mlflow-run-learning-curve")
    _to_docs(shot, "mlflow-run-curves.png")
    # One vertex per iteration (plotly merges collinear points, so at most that many).
    vertices = path.count("M") + path.count("L")
    assert 2 <= vertices <= len(history), (vertices, len(history), shot)

    name = registered["model_name"]
    champion = MlflowClient(mlflow_server.url).get_model_version_by_alias(name, "champion")
    ui.driver.get(f"{mlflow_server.url}/#/models/{name}")
    row = ui.wait(
        f"version {champion.version} with the champion alias",
        lambda: [
            r
            for r in ui.find("tr, [role=row]")
            if f"Version {champion.version}" in r.text and "champion" in r.text
        ],
    )
    ui.shot("mlflow-model-champion")
    assert row


def _alert_naming(ui: AirflowUI, field: str) -> str:
    """The text of the form's error box that names ``field``, scrolled into view."""
    box = ui.wait(
        f"the error naming {field}",
        lambda: [a for a in ui.alerts() if field in a.get_attribute("textContent")],
    )[0]
    ui.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    return str(box.get_attribute("textContent"))


def test_wrong_values_typed_in_the_form_are_refused(ui: AirflowUI, airflow: Airflow) -> None:
    runs_before = len(_runs(airflow, "rllib_train"))
    dialog = ui.open_trigger_form("rllib_train")
    # The number widget takes its bounds from the schema: 0 nodes becomes the minimum, 1.
    ui.type_into("nodes", "0")
    ui.type_into("time_limit", "half an hour")
    assert ui.field("nodes").get_attribute("value") == "1"
    ui.shot("train-form-wrong-values")
    ui.trigger_button(dialog).click()
    alert = _alert_naming(ui, "time_limit")
    ui.shot("train-form-refused")
    assert "Invalid input for param time_limit" in alert and "does not match" in alert, alert
    assert "/runs/" not in ui.driver.current_url

    sweep = ui.open_trigger_form("rllib_sweep")
    ui.type_json("configs", '[{"lr": 0.001}, 7]')
    errors = ui.wait("the configs field's message", lambda: ui.invalid_fields(sweep))
    ui.shot("sweep-form-configs-not-objects")
    assert "must be objects" in errors.get("configs", ""), errors
    assert not ui.trigger_button(sweep).is_enabled()
    ui.type_json("configs", '[{"lr": 0.001}, {"nodez": 2}]')
    ui.wait("configs valid JSON again", lambda: not ui.invalid_fields(sweep))
    ui.trigger_button(sweep).click()
    alert = _alert_naming(ui, "configs")
    ui.shot("sweep-form-refused")
    assert "nodez" in alert, alert

    assert len(_runs(airflow, "rllib_train")) == runs_before
    assert not [r for r in _runs(airflow, "rllib_sweep") if "nodez" in json.dumps(r["conf"])]
    # (No run, hence no Slurm job: squeue is shared with other users' jobs, not compared.)


def test_sweep_with_two_configurations_typed_in_the_form(ui: AirflowUI, airflow: Airflow) -> None:
    tag = f"{time.time_ns() % 10**8:08d}"
    small = {
        "stop_iterations": 2,
        "train_batch_size": 1000,
        "nodes": 1,
        "cpus_per_node": 2,
        "num_env_runners": 1,
        "envs_per_runner": 4,
    }
    configs = [{"lr": 0.0003, "seed": 1, **small}, {"lr": 0.001, "seed": 2, **small}]
    dialog = ui.open_trigger_form("rllib_sweep")
    ui.type_into("experiment_name", f"ui-sweep-{tag}")
    ui.type_into("register_model_name", f"ui-sweep-model-{tag}")
    ui.type_json("configs", json.dumps(configs))
    ui.wait("configs accepted by the form", lambda: not ui.invalid_fields(dialog))
    ui.shot("sweep-form-two-configs")
    run_id = _click_trigger(ui, dialog, "rllib_sweep")
    run = _wait_run(ui, airflow, "rllib_sweep", run_id)
    time.sleep(2)
    ui.shot("sweep-finished")
    assert run["conf"]["configs"] == configs
    assert run["conf"]["experiment_name"] == f"ui-sweep-{tag}"
    status, mapped = airflow.call(
        "GET", f"/dags/rllib_sweep/dagRuns/{run_id}/taskInstances/train/listMapped"
    )
    assert status == 200, mapped
    assert sorted(ti["map_index"] for ti in mapped["task_instances"]) == [0, 1], mapped
    assert run["state"] == "success", [ti["state"] for ti in mapped["task_instances"]]
