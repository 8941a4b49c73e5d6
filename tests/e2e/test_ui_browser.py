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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import ROOT
from tests.e2e.browser import AirflowUI, missing_browser

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
