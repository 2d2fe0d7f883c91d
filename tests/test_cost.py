"""Measured cost: wall x the resources a run held, added up over a resumed run's invocations and
summed over a parent's children, in a real SQLite MLflow store."""

from __future__ import annotations

import time

import pytest

from vspw_ray.config import TrainConfig
from vspw_ray.cost import Held, log_cost, measured_cost, run_cost, sum_child_costs, train_held


def test_train_holds_what_ray_asks_for_its_workers():
    assert train_held(TrainConfig(num_workers=2, batch_size=4)) == Held(2.0, 0.0)
    assert train_held(TrainConfig(num_workers=4, batch_size=8, use_gpu=True)) == Held(0.0, 4.0)
    held = train_held(TrainConfig(num_workers=2, batch_size=4, use_gpu=True,
                                  resources_per_worker={"CPU": 6, "trainer": 1}))
    assert held == Held(12.0, 2.0)  # the GPU each added by use_gpu, custom resources not counted


@pytest.fixture()
def runs(tmp_path):
    import mlflow

    from vspw_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("cost", artifact_location=str(tmp_path / "artifacts"))
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.create_run(exp).info.run_id

    def child(stage: str) -> str:
        return client.create_run(exp, tags={tracking.PARENT_TAG: parent, "stage": stage}).info.run_id
    return uri, parent, child


def test_a_resumed_run_adds_its_invocations_and_a_total_is_set(runs):
    uri, _, child = runs
    rid = child("train")
    log_cost(uri, rid, Held(2.0, 1.0), 1800.0)  # first invocation, then the resumed one
    totals = log_cost(uri, rid, Held(2.0, 1.0), 900.0)
    assert totals == pytest.approx({"cost/wall_s": 2700.0, "cost/cpu_hours": 1.5,
                                    "cost/gpu_hours": 0.75})
    assert run_cost(uri, rid) == pytest.approx(totals)
    trial = child("tune-trial")  # Tune's time_total_s is a total already: logged twice, set twice
    for _ in range(2):
        log_cost(uri, trial, Held(1.0), 360.0, accumulate=False)
    assert run_cost(uri, trial)["cost/cpu_hours"] == pytest.approx(0.1)


def test_measured_cost_counts_a_failed_body_and_the_parent_sums_its_children(runs):
    import time

    uri, parent, child = runs
    train, infer = child("train"), child("infer")
    log_cost(uri, train, Held(4.0, 2.0), 3600.0)
    start = time.perf_counter()
    with pytest.raises(RuntimeError), measured_cost(uri, infer, Held(1.0, 1.0)):
        time.sleep(0.05)
        raise RuntimeError("a failing stage held its resources all the same")
    wall = time.perf_counter() - start
    spent = run_cost(uri, infer)
    assert 0.05 <= spent["cost/wall_s"] <= wall
    assert spent["cost/gpu_hours"] == pytest.approx(spent["cost/wall_s"] / 3600)
    sums = sum_child_costs(uri, parent)
    assert sums["cost/gpu_hours"] == pytest.approx(2.0 + spent["cost/gpu_hours"])
    assert sums["cost/cpu_hours"] == pytest.approx(4.0 + spent["cost/cpu_hours"])
    assert sums["cost/train/wall_s"] == pytest.approx(3600.0)
    assert "cost/wall_s" not in sums  # stages overlap: wall adds up per stage only
    assert run_cost(uri, parent) == pytest.approx(sums)


def test_system_metrics_are_logged_per_node_while_a_block_runs_and_once_as_it_ends(runs):
    """MLflow's monitor (tracking.system_metrics): samples while the block runs under the node's
    name, a last one as it ends (a block shorter than the interval still has figures), and a
    second block on the same run continues the steps instead of overwriting them."""
    import mlflow

    from vspw_ray import tracking

    uri, _, child = runs
    rid = child("train")
    client = mlflow.tracking.MlflowClient(uri)
    key = "system/node-a/cpu_utilization_percentage"
    deadline = time.time() + 120
    with tracking.system_metrics(uri, rid, "node-a", interval_s=0.05):
        while key not in client.get_run(rid).data.metrics:  # a sample while it runs
            assert time.time() < deadline, "no system metrics logged while the block ran"
            time.sleep(0.05)
    first = len(client.get_metric_history(rid, key))
    assert first >= 2  # the samples while it ran, and the last one as it ended
    with tracking.system_metrics(uri, rid, "node-a", interval_s=3600):  # ends before a sample
        pass
    history = client.get_metric_history(rid, key)
    assert [m.step for m in history] == list(range(first + 1))  # continued: one more step
    assert all(0.0 <= m.value <= 100.0 for m in history)
    metrics = client.get_run(rid).data.metrics
    assert metrics["system/node-a/system_memory_usage_megabytes"] > 0
    assert not [k for k in metrics if k.startswith("system/") and "/node-a/" not in k]


def test_one_process_per_node_samples_a_run_without_a_rank(runs):
    """``tracking.node_system_metrics`` (Ray Data's model actors have no rank): the first
    process of a node to ask samples it, the others get None while it holds the node, and a
    later one may take over once it stopped (its last sample logged as it stopped)."""
    import mlflow

    from vspw_ray import tracking

    uri, _, child = runs
    rid = child("infer")
    first = tracking.node_system_metrics(uri, rid, "node-b", interval_s=3600)
    assert callable(first)
    assert tracking.node_system_metrics(uri, rid, "node-b", interval_s=3600) is None
    first()
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(
        rid, "system/node-b/cpu_utilization_percentage")
    assert len(history) == 1  # the last sample, as it stopped
    again = tracking.node_system_metrics(uri, rid, "node-b", interval_s=3600)
    assert callable(again)
    again()
