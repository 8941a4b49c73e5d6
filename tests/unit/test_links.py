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


def test_a_profiles_job_page_reaches_the_link_of_the_dags_train_task(monkeypatch) -> None:
    """job_url_template end to end: profile → resolve → the DAG's train task → XCom → link."""
    from slurm_ray import profiles
    from slurm_ray.params import param_specs, resolve_run
    from slurm_ray.pipeline import plan_sweep_runs

    site = profiles.get_profile("local").model_copy(
        update={
            "name": "ood_site",
            "job_url_template": "https://ood.example/jobs/{cluster}/{job_id}",
        }
    )
    monkeypatch.setitem(profiles._REGISTERED, "ood_site", site)
    defaults = {name: spec["default"] for name, spec in param_specs().items()}
    monkeypatch.setenv("SLURM_RAY_MLFLOW_URI", "http://127.0.0.1:5055")
    resolved = resolve_run(defaults | {"profile": "ood_site"})
    assert resolved["job_url_template"] == site.job_url_template
    runs = plan_sweep_runs(defaults | {"profile": "ood_site", "configs": [{"nodes": 1}]})
    assert runs[0]["job_url_template"] == site.job_url_template

    from slurm_ray.operators.run_state import RunState
    from slurm_ray.operators.training import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="train",
        ssh_conn_id="c",
        entrypoint="true",
        **{k: runs[0][k] for k in ("cluster_name", "job_url_template")},
    )
    assert "job_url_template" in op.template_fields

    class TI:
        xcom: dict[str, str] = {}

        def xcom_push(self, key: str, value: str) -> None:
            self.xcom[key] = value

    ti = TI()
    op._push_job(RunState(context={"ti": ti}, run_dir="/r", job_id="42"))  # type: ignore[typeddict-item]
    stored = dict(ti.xcom)

    from airflow.models.taskinstancekey import TaskInstanceKey
    from slurm_ray import links

    monkeypatch.setattr(links.XCom, "get_value", lambda ti_key, key: stored.get(key))
    key = TaskInstanceKey("rllib_train", "train", "manual__1", 1, -1)
    assert links.SlurmJobLink().get_link(op, ti_key=key) == "https://ood.example/jobs/ood_site/42"
