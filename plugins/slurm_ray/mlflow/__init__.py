"""MLflow tracking for slurm_ray: one run per training task, live metrics, model registry.

Airflow side only: needs the MLflow *client* (``mlflow-skinny``), never ray,
torch, numpy or pandas; importing this package imports no MLflow at all.
Compute nodes never talk to MLflow: the triggerer relays ``metrics.jsonl``
rows, and at completion the worker downloads the run directory's files over
SSH and uploads them to the tracking server.

One module per concept:

* :mod:`~slurm_ray.mlflow.settings`: :class:`MlflowSettings` (where, which experiment);
* :mod:`~slurm_ray.mlflow.hook`: :class:`MlflowHook` (the ``mlflow`` connection type)
  and credentials kept out of stored state;
* :mod:`~slurm_ray.mlflow.reachability`: the probe before submitting, and the wait;
* :mod:`~slurm_ray.mlflow.keys`: MLflow's naming rules for params, tags, metrics;
* :mod:`~slurm_ray.mlflow.runs`: ensure / record / end the task's run;
* :mod:`~slurm_ray.mlflow.relay`: :class:`MetricsRelay` (each step exactly once);
* :mod:`~slurm_ray.mlflow.artifacts`: finalize a run (files, checkpoint, model);
* :mod:`~slurm_ray.mlflow.accounting`: what the Slurm job cost;
* :mod:`~slurm_ray.mlflow.registry`: register and promote model versions;
* :mod:`~slurm_ray.mlflow.compare` and :mod:`~slurm_ray.mlflow.plot`: a sweep's
  comparison, its figure drawn with matplotlib in the cluster environment.

What the operator calls when: before submitting ``check_reachable`` (unless
``relay_later``), ``ensure_run`` and ``record_job``; while the job runs the
trigger's ``make_async_sink``; at completion ``deliver_rows`` with every row of
``metrics.jsonl`` (steps already logged are skipped), ``finalize_run`` and
optionally ``promote_if_better``; a sweep's last task ``compare_runs``. Every
function takes :class:`MlflowSettings` (or the relay dict) and builds its own
``MlflowClient``; nothing touches MLflow's global state, so several tasks can
share a process.
"""
