"""The Slurm job link without a site job page: this task try's log in the Airflow UI."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("map_index", "tail"),
    [(-1, "tasks/train?"), (3, "tasks/train/mapped/3?")],
)
def test_task_log_url_is_a_same_site_http_link(monkeypatch, map_index: int, tail: str) -> None:
    from airflow.models.taskinstancekey import TaskInstanceKey
    from slurm_ray.links import task_log_url

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080/")
    key = TaskInstanceKey("rllib_train", "train", "manual__2026-01-01T00:00:00+00:00", 2, map_index)
    url = task_log_url(key, slurm_job="local:42")
    # The UI renders only http(s)/mailto or same-site links: never slurm://.
    assert url.startswith(
        "http://127.0.0.1:8080/dags/rllib_train/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/"
    )
    assert tail in url and url.endswith("try_number=2&slurm_job=local%3A42")
