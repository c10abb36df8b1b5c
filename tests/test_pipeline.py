"""The pipeline as users drive it: dvc repro, dvc exp run, the queue, metrics
diff, exp show, and what lands in MLflow. One temporary repository for the
module; the tests run in file order and build on each other's state."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from nibabel.testing import data_path as nibabel_data
from pydicom.data import get_testdata_file

from brainmri.core.paths import figures_file
from brainmri.core.shards import ShardIndex

from helpers import (
    CLASSES,
    PLANTED,
    create_project,
    headless_chromium,
    needs_chromium,
    run,
    stages_run,
    synthetic_image,
    update_params,
    wait_for_queue,
    write_dicom_series,
)

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

ALL_STAGES = [
    "validate",
    "ingest",
    "dedup",
    "split",
    "boxes",
    "balance",
    "train",
    "evaluate",
    "gradcam",
    "model_card",
    "export",
]
# A params change reruns the params check first.
DOWNSTREAM_OF_TRAIN = ["validate", "train", "evaluate", "gradcam", "model_card", "export"]


def mlflow_stages(stages: list[str]) -> list[str]:
    """The stages that log an MLflow run: all but the params check."""
    return sorted(stage for stage in stages if stage != "validate")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return create_project(tmp_path_factory.mktemp("pipeline") / "project")


def back_to_baseline(repo: Path) -> None:
    """Undo an experiment applied to the workspace: params, lock file, metrics and outputs."""
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout


def mlflow_client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path, filter_string: str = "") -> list:
    """The stage runs (not the pipelines' parent runs) matching `filter_string`."""
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("brain-mri")
    stage_runs = " and ".join(filter(None, [filter_string, "tags.`brainmri.stage` LIKE '%'"]))
    return client.search_runs([experiment.experiment_id], filter_string=stage_runs, max_results=500)


def test_repro_runs_every_stage_in_order_then_nothing(repo):
    first = run(["dvc", "repro"], repo)
    assert stages_run(first.stdout) == ALL_STAGES
    for output in (
        "models/model.keras",
        "models/model.json",
        "reports/predictions.csv",
        "data/prepared/index.json",
        "exports/model_int8.tflite",
    ):
        assert (repo / output).is_file(), output
    assert list((repo / "reports" / "gradcam").glob("*.png"))
    metrics = json.loads((repo / figures_file("evaluate")).read_text())
    assert {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "weighted_f1",
        "roc_auc_macro",
        "f1.glioma",
        "precision.notumor",
        "recall.meningioma",
        "support.pituitary",
        "roc_auc.pituitary",
        "log_loss",
        "brier",
        "ece",
        "review_fraction",
        "accuracy_accepted",
        "accuracy_ci_low",
        "macro_f1_ci_high",
    } <= set(metrics)
    assert metrics["macro_f1_ci_low"] <= metrics["macro_f1"] <= metrics["macro_f1_ci_high"]
    train = json.loads((repo / figures_file("train")).read_text())
    assert train["temperature"] > 0 and train["val_log_loss"] <= train["val_log_loss_uncalibrated"] + 1e-9
    assert {"uncalibrated.ece", "uncalibrated.brier"} <= set(metrics) or train["temperature"] == 1.0
    card = (repo / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card and f"| macro-F1 | {metrics['macro_f1']:.3f} [" in card

    second = run(["dvc", "repro"], repo)
    assert stages_run(second.stdout) == []
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline results"], repo)


def test_manifests_are_byte_identical_when_rebuilt(repo):
    outputs = [
        "data/interim/manifest.csv",
        "data/interim/dedup.csv",
        "data/interim/split.csv",
        "data/prepared/train-00000.tfrecord",
        "data/prepared/index.json",
    ]
    before = {path: (repo / path).read_bytes() for path in outputs}
    forced = run(["dvc", "repro", "--force", "balance", "--single-item"], repo)
    run(["dvc", "repro", "--force", "ingest", "--single-item"], repo)
    assert stages_run(forced.stdout) == ["balance"]
    assert {path: (repo / path).read_bytes() for path in outputs} == before
    assert stages_run(run(["dvc", "repro"], repo).stdout) == []


def test_the_same_images_under_another_path_rerun_ingest_only(repo, tmp_path):
    moved = tmp_path / "elsewhere" / "sample"
    shutil.copytree(repo / "data" / "sample", moved)
    update_params(repo / "params.yaml", {"ingest": {"source": str(moved)}})
    try:
        assert stages_run(run(["dvc", "repro"], repo).stdout) == ["validate", "ingest"]
        assert "up to date" in run(["dvc", "status"], repo).stdout
    finally:
        back_to_baseline(repo)


def test_params_change_reruns_only_the_stages_that_read_it(repo):
    result = run(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1"], repo)
    assert stages_run(result.stdout) == DOWNSTREAM_OF_TRAIN
    assert json.loads((repo / figures_file("train")).read_text())["epochs_run"] == 1


def test_metrics_diff_reports_the_changed_metrics(repo):
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    assert diff["metrics/train.json"]["epochs_run"] == {"old": 2, "new": 1, "diff": -1}
    # One epoch fewer changes the calibration error (a continuous figure) whatever the labels do.
    assert diff["metrics/evaluate.json"]["ece"]["old"] != diff["metrics/evaluate.json"]["ece"]["new"]
    # Only the headline figures: the long tail (log loss, per-class AUCs, ...) is in reports/figures/.
    assert set(diff) <= {"metrics/train.json", "metrics/evaluate.json", "metrics/gradcam.json"}
    assert "log_loss" not in diff["metrics/evaluate.json"] and len(diff["metrics/evaluate.json"]) <= 9


def test_plots_render_training_curves_and_the_confusion_matrix(repo):
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not shown.get("errors"), shown["errors"]
    rendered = {name: plots for name, plots in shown["data"].items() if plots}
    assert {"accuracy", "loss", "confusion", "reliability", "risk_coverage"} <= set(rendered), list(shown["data"])
    assert {f"metrics/plots/roc/{name}.csv" for name in ("glioma", "notumor")} <= set(rendered)
    assert any(name.startswith("metrics/plots/precision_recall/") for name in rendered)
    confusion = rendered["confusion"]
    assert len(confusion[0]["content"]["data"]["values"]) == 8  # one point per test image


EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)


@needs_chromium
def test_plots_html_renders_with_the_network_blocked(repo, tmp_path):
    shown = run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    page = tmp_path / "plots" / "index.html"
    assert page.is_file(), shown.stdout
    assert EXTERNAL.findall(page.read_text()) == []  # Vega, Vega-Lite and vega-embed are inlined
    with headless_chromium(tmp_path / "profile", offline=True) as browser:
        browser.get(page.as_uri())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            drawn = browser.execute_script("return document.querySelectorAll('div[id] canvas, div[id] svg').length")
            if drawn >= 5:
                break
            time.sleep(0.5)
        assert drawn >= 5, browser.get_log("browser")


def test_exp_show_lists_the_experiment_with_params_and_metrics(repo):
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    by_name = {exp["name"]: exp for exp in experiments}
    assert "one-epoch" in by_name
    data = by_name["one-epoch"]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert data["metrics"]["metrics/train.json"]["data"]["epochs_run"] == 1

    # The README's view: the params that differ and the headline metrics, in a 120-column terminal.
    table = run(["make", "-s", "exp-show"], repo, env={"COLUMNS": "120"}).stdout
    assert "one-epoch" in table and "train.epochs" in table and "macro_f1" in table and "…" not in table
    assert "f1.glioma" not in table and "train.lr" not in table  # unchanged params and minor keys left out
    assert max(len(line) for line in table.splitlines()) <= 120


def test_queued_experiments_run_and_log_to_the_workspace_store(repo):
    back_to_baseline(repo)
    run(["dvc", "exp", "run", "--queue", "-n", "queued-a", "-S", "train.lr=0.003"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "queued-b", "-S", "train.lr=0.005", "-S", "train.epochs=1"], repo)
    run(["dvc", "queue", "start", "--jobs", "1"], repo)
    status = wait_for_queue(repo, timeout=420)
    assert status.count("Success") == 2, status + run(["dvc", "queue", "logs", "queued-b"], repo, check=False).stdout

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {exp["name"] for baseline in shown for exp in (baseline.get("experiments") or [])}
    assert {"queued-a", "queued-b"} <= names
    for name, lr in (("queued-a", "0.003"), ("queued-b", "0.005")):
        stage_runs = runs(repo, f"tags.`dvc.exp_name` = '{name}'")
        assert sorted(r.data.tags["brainmri.stage"] for r in stage_runs) == mlflow_stages(DOWNSTREAM_OF_TRAIN)
        train = next(r for r in stage_runs if r.data.tags["brainmri.stage"] == "train")
        assert train.data.params["train.lr"] == lr
        assert train.info.status == "FINISHED"
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("**/mlflow.db")), "a queued run made its own store"


def test_compare_gives_a_verdict_on_two_experiments(repo):
    command = [sys.executable, "-m", "brainmri.cli", "compare", "queued-a", "queued-b"]
    text = run(command, repo).stdout
    assert "test images" in text and "McNemar's exact test" in text
    assert re.search(r"B is (better than|worse than|indistinguishable from) A at the 5% level", text)
    assert "| macro_f1 |" in run([*command, "--md"], repo).stdout
    workspace = run([*command[:-2], "workspace", "queued-a"], repo).stdout  # the working tree's outputs
    assert "B is" in workspace
    missing = run([*command[:-1], "no-such-experiment"], repo, check=False)
    assert missing.returncode == 1 and "'no-such-experiment' is not a predictions file" in missing.stderr


def test_an_external_test_folder_is_checked_and_scored(repo, tmp_path):
    external = tmp_path / "external"
    for class_index, label in enumerate(CLASSES):
        (external / label).mkdir(parents=True)
        for variant in (100, 101):  # new images, unlike the project's
            synthetic_image(class_index, variant).save(external / label / f"{variant}.png")
    shutil.copy(repo / "data" / "sample" / "glioma" / "glioma_000.jpg", external / "glioma" / "seen.jpg")
    (external / "glioma" / "broken.png").write_bytes(b"")
    result = run(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "external",
            "-S",
            f"evaluate.external={external}",
            "-S",
            "evaluate.tta=true",
            "-S",
            "evaluate.review_threshold=auto",
            "-S",
            "evaluate.ensemble=[models]",
        ],
        repo,
    )
    assert stages_run(result.stdout) == ["validate", "evaluate", "model_card"]
    metrics = json.loads((repo / figures_file("evaluate")).read_text())
    # auto: chosen from the validation confidences the trained model carries, no retraining
    assert metrics["review_target_accuracy"] == 0.99 and 0.0 <= metrics["review_val_coverage"] <= 1.0
    assert (
        isinstance(metrics["review_threshold"], float)
        and metrics["external.review_threshold"] == metrics["review_threshold"]
    )
    # an ensemble of the model with itself scores what the model alone does, member beside ensemble
    assert metrics["ensemble.members"] == 2
    assert metrics["ensemble.macro_f1"] == metrics["ensemble.member1.macro_f1"] == metrics["macro_f1"]
    assert metrics["external.images"] == 8
    assert metrics["external.leaked_removed"] == 1 and metrics["external.rejected"] == 1
    assert 0.0 <= metrics["external.accuracy"] <= 1.0 and "accuracy" in metrics
    assert {"tta.accuracy", "tta.macro_f1", "tta.ece"} <= set(metrics)  # beside the plain keys
    leakage = (repo / "reports" / "evaluate" / "external_leakage.csv").read_text()
    assert "seen.jpg" in leakage
    for table in ("external_leakage.csv", "external_predictions.csv", "external_rejects.csv"):
        assert str(external) not in (repo / "reports" / "evaluate" / table).read_text()  # relative to the folder
    assert "**External test set** (8 images; 1 removed as copies" in (repo / "MODEL_CARD.md").read_text()
    back_to_baseline(repo)


def test_a_keras_applications_backbone_trains_evaluates_and_is_explained(repo):
    result = run(
        ["dvc", "exp", "run", "-n", "backbone", "-S", "train.model=mobilenet_v3_small", "-S", "train.epochs=1"], repo
    )
    assert stages_run(result.stdout) == DOWNSTREAM_OF_TRAIN
    assert json.loads((repo / "models" / "model.json").read_text())["model"] == "mobilenet_v3_small"
    assert "accuracy" in json.loads((repo / figures_file("evaluate")).read_text())
    assert "heatmaps from layer 'backbone'" in result.stdout
    assert json.loads((repo / figures_file("gradcam")).read_text())["images"] == 4
    back_to_baseline(repo)


def test_mlflow_holds_every_stage_run_with_params_metrics_tags_and_artifacts(repo):
    workspace = [r for r in runs(repo) if "dvc.exp_name" not in r.data.tags]
    first_pipeline = workspace[-1].data.tags["brainmri.pipeline"]  # oldest run: the first repro
    group = [r for r in workspace if r.data.tags["brainmri.pipeline"] == first_pipeline]
    assert sorted(r.data.tags["brainmri.stage"] for r in group) == mlflow_stages(ALL_STAGES)
    head = run(["git", "rev-list", "--max-parents=0", "HEAD"], repo).stdout.strip()
    by_stage = {r.data.tags["brainmri.stage"]: r for r in group}
    assert all(r.data.tags["mlflow.source.git.commit"] == head for r in group)
    # One parent run per pipeline configuration: the UI shows the repro as one row that expands.
    parents = {r.data.tags["mlflow.parentRunId"] for r in group}
    assert len(parents) == 1
    parent = mlflow_client(repo).get_run(parents.pop())
    assert (
        parent.info.run_name == f"pipeline {head[:7]}" and parent.data.tags["brainmri.pipeline_run"] == first_pipeline
    )
    # The runs table shows the configuration and its headline figures on the collapsed row.
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["ingest.source"] == "data/sample"
    assert parent.data.metrics["macro_f1"] == by_stage["evaluate"].data.metrics["macro_f1"]
    assert {"macro_f1_ci_low", "macro_f1_ci_high", "final.best_val_accuracy"} <= set(parent.data.metrics)
    assert by_stage["ingest"].data.params["ingest.source"] == "data/sample"
    assert by_stage["ingest"].data.metrics["images"] == 32
    assert by_stage["train"].data.params["train.epochs"] == "2"
    assert "val_accuracy" in by_stage["train"].data.metrics
    assert 0.0 <= by_stage["evaluate"].data.metrics["accuracy"] <= 1.0

    client = mlflow_client(repo)
    # The split's training and validation rows as dataset inputs: the runs table's Dataset column.
    inputs = client.get_run(by_stage["train"].info.run_id).inputs.dataset_inputs
    datasets = {i.dataset.name: {t.key: t.value for t in i.tags} for i in inputs}
    digest = ShardIndex.load(repo / "data" / "prepared").content_digest()[:12]
    assert datasets.keys() == {f"prepared-{digest}-train", f"prepared-{digest}-val"}  # not the folder's name
    assert datasets[f"prepared-{digest}-train"]["mlflow.data.context"] == "training"
    assert all(len(i.dataset.digest) == 12 for i in inputs)
    tested = client.get_run(by_stage["evaluate"].info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in tested] == [
        (f"prepared-{digest}-test", "testing")
    ]
    history = client.get_metric_history(by_stage["train"].info.run_id, "val_loss")
    assert len(history) == 2  # one point per epoch
    assert not [key for key in by_stage["train"].data.metrics if key.startswith("validation_")]  # each curve once
    evaluate_files = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluate")}
    assert {
        f"evaluate/{name}"
        for name in (
            "predictions.csv",
            "confusion_matrix.png",
            "roc.png",
            "precision_recall.png",
            "reliability.png",
            "risk_coverage.png",
            "classification_report.txt",
        )
    } <= evaluate_files
    gradcam_files = {a.path for a in client.list_artifacts(by_stage["gradcam"].info.run_id, "gradcam")}
    assert {f"gradcam/grid_{name}.png" for name in ("glioma", "meningioma", "notumor", "pituitary")} <= gradcam_files
    assert len(client.list_artifacts(by_stage["gradcam"].info.run_id, "gradcam/images")) == 4
    assert 0.0 <= by_stage["gradcam"].data.metrics["energy_in_brain"] <= 1.0
    report = {a.path for a in client.list_artifacts(by_stage["ingest"].info.run_id, "data_report")}
    assert report == {f"data_report/{name}" for name in ("counts.png", "resolution.png", "samples.png", "report.json")}

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    logged = [
        m
        for m in mlflow.search_logged_models(
            experiment_ids=[by_stage["train"].info.experiment_id], output_format="list"
        )
        if m.source_run_id == by_stage["train"].info.run_id
    ]
    assert len(logged) == 1
    model = mlflow.keras.load_model(logged[0].model_uri)
    assert model.output_shape == (None, 4)
    versions = client.search_model_versions("name='brain-mri-classifier'")
    assert by_stage["train"].info.run_id in {version.run_id for version in versions}
    # Each version carries its model file's digest; evaluate tagged it with its run and named a champion.
    [first] = [version for version in versions if version.run_id == by_stage["train"].info.run_id]
    assert len(first.tags["brainmri.model_sha256"]) == 64 and "brainmri.evaluate_run" in first.tags
    champion = client.get_model_version_by_alias("brain-mri-classifier", "champion")
    image = repo / "data" / "sample" / "glioma" / "glioma_000.jpg"
    uri = "models:/brain-mri-classifier@champion"
    predicted = run([sys.executable, "-m", "brainmri.cli", "predict", str(image), "--model", uri], repo)
    assert json.loads(predicted.stdout)["predicted_class"] in CLASSES and champion.version


def test_a_fresh_clone_pulls_every_output_from_a_folder_remote_and_reproduces_nothing(repo, tmp_path):
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], repo)
    run(["git", "commit", "-qam", "a shared DVC remote"], repo)
    run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models" / "model.keras").exists()
    run(["dvc", "pull"], clone)
    for output in (
        "models/model.keras",
        "data/prepared/index.json",
        "data/interim/split.csv",
        "reports/predictions.csv",
        "reports/data/report.json",
    ):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output
    assert stages_run(run(["dvc", "repro"], clone).stdout) == []


@pytest.fixture
def s3_server():
    """moto's standalone S3-API server on a free local port, stopped afterwards."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="brainmri")
        yield endpoint, credentials
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_same_round_trip_through_the_real_s3_plugin(repo, tmp_path, s3_server):
    endpoint, credentials = s3_server
    run(["dvc", "remote", "add", "s3", "s3://brainmri/cache"], repo)
    run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], repo)
    run(["git", "commit", "-qam", "an S3 DVC remote"], repo)
    run(["dvc", "push", "-r", "s3"], repo, env=credentials)
    clone = tmp_path / "s3-clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull", "-r", "s3"], clone, env=credentials)
    for output in ("models/model.keras", "data/prepared/index.json", "reports/gradcam"):
        assert (clone / output).exists(), output
    assert (clone / "models" / "model.keras").read_bytes() == (repo / "models" / "model.keras").read_bytes()
    assert stages_run(run(["dvc", "repro"], clone).stdout) == []


def test_an_experiment_travels_through_the_git_remote(repo, tmp_path):
    remote = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], tmp_path)
    run(["git", "remote", "add", "origin", str(remote)], repo)
    run(["git", "push", "-q", "origin", "main"], repo)
    run(["dvc", "exp", "push", "origin", "one-epoch"], repo)
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(remote), str(clone)], tmp_path)
    run(["dvc", "exp", "pull", "origin", "one-epoch"], clone)
    # The experiment's baseline is an older commit than the clone's HEAD.
    shown = json.loads(run(["dvc", "exp", "show", "--all-commits", "--json"], clone).stdout)
    experiment = next(
        exp for baseline in shown for exp in (baseline.get("experiments") or []) if exp["name"] == "one-epoch"
    )
    data = experiment["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert data["metrics"]["metrics/train.json"]["data"]["epochs_run"] == 1


@pytest.mark.parametrize(
    "change, named, kept",
    [
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'", "models/model.keras"),
        ({"train": {"image_size": 0}}, "'train.image_size'", "data/prepared/index.json"),
        (
            {"ingest": {"source": "data/nowhere"}},
            "ingest.source: folder 'data/nowhere' does not exist",
            "data/interim/manifest.csv",
        ),
        ({"train": {"model": "resnet9000"}}, "unknown model 'resnet9000'", "models/model.keras"),
        ({"train": {"fine_tune": {"epochs": 2}}}, "train.fine_tune.epochs needs", "models/model.keras"),
    ],
)
def test_bad_params_stop_the_pipeline_naming_the_key_and_keep_every_output(repo, change, named, kept):
    run(["dvc", "repro"], repo)  # everything built (nothing to do when earlier tests built it)
    update_params(repo / "params.yaml", change)
    result = run(["dvc", "repro"], repo, check=False)
    assert result.returncode != 0
    assert named in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert stages_run(result.stdout) == ["validate"]
    for output in (kept, "models/model.keras", "data/prepared/index.json", "metrics/train_history.csv"):
        assert (repo / output).is_file(), f"{output} deleted by a failed params check"
    run(["git", "checkout", "--", "params.yaml"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout  # nothing to rebuild


def test_a_named_pipe_in_the_source_is_named_before_dvc_reads_it(repo):
    # DVC reads every file of ingest.source to hash it, and reading a named pipe blocks.
    fifo = repo / "data" / "sample" / "glioma" / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        checked = run([sys.executable, "-m", "brainmri.cli", "check"], repo, check=False, timeout=60)
        assert checked.returncode == 1 and "DVC cannot hash" in checked.stderr and "pipe.jpg" in checked.stderr
        update_params(repo / "params.yaml", {"gradcam": {"alpha": 0.5}})  # validate reruns on any params change
        result = run(["dvc", "repro"], repo, check=False, timeout=180)
        assert result.returncode != 0 and stages_run(result.stdout) == ["validate"]
        assert "DVC cannot hash" in result.stderr + result.stdout and "pipe.jpg" in result.stderr + result.stdout
        assert (repo / "models" / "model.keras").is_file()
    finally:
        fifo.unlink()
        run(["git", "checkout", "--", "params.yaml"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_tracking_outage_stops_the_stage_or_with_the_switch_off_warns_and_completes(repo):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    outage = {"MLFLOW_TRACKING_URI": uri}
    manifest = repo / "data" / "interim" / "manifest.csv"
    expected = manifest.read_bytes()
    failed = run(["dvc", "repro", "--force", "--single-item", "ingest"], repo, check=False, env=outage)
    assert failed.returncode != 0 and uri in failed.stderr + failed.stdout
    assert "Traceback" not in failed.stderr + failed.stdout

    update_params(repo / "params.yaml", {"tracking": {"required": False}})
    untracked = run(["dvc", "repro", "--force", "--single-item", "ingest"], repo, env=outage)
    assert (untracked.stderr + untracked.stdout).count(f"WARNING: MLflow tracking store {uri}") == 1
    assert manifest.read_bytes() == expected and (repo / "reports" / "data" / "report.json").is_file()
    back_to_baseline(repo)


PREDICT_UNDER_JAX = """
import sys
import numpy as np
from brainmri.model.models import class_probabilities, load_model
from brainmri.core.shards import ShardIndex
model, _ = load_model("models")
images, _, _ = ShardIndex.load("data/prepared").arrays("test")
np.save(sys.argv[1], class_probabilities(model, images))
"""


# Python imports sitecustomize at start-up: this one makes TensorFlow uninstalled, as on a GPU host with JAX only.
WITHOUT_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError(f"{name}: TensorFlow is not installed here")

sys.meta_path.insert(0, NoTensorFlow())
"""


def test_keras_backend_jax_trains_and_evaluates_and_the_model_predicts_the_same_under_tensorflow(repo, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW)
    # train.backend: auto follows KERAS_BACKEND
    jax = {"KERAS_BACKEND": "jax", "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{repo / 'src'}"}
    trained = run(["dvc", "repro", "--force", "--single-item", "train"], repo, env=jax)
    assert "'backend': 'jax'" in trained.stdout
    evaluated = run(["dvc", "repro", "evaluate"], repo, env=jax)
    assert stages_run(evaluated.stdout) == ["evaluate"]
    meta = json.loads((repo / "models" / "model.json").read_text())
    assert meta["trained_backend"] == "jax" and meta["trained_precision"] == "float32"
    assert 0 <= json.loads((repo / figures_file("evaluate")).read_text())["macro_f1"] <= 1
    train_run, evaluate_run = (runs(repo, f"tags.`brainmri.stage` = '{stage}'")[0] for stage in ("train", "evaluate"))
    assert train_run.data.tags["brainmri.train.backend"] == "jax"
    assert evaluate_run.data.tags["brainmri.evaluate.backend"] == "jax"

    under_jax = tmp_path / "jax.npy"
    run([sys.executable, "-c", PREDICT_UNDER_JAX, str(under_jax)], repo, env=jax)
    blocked = run([sys.executable, "-c", "import tensorflow"], repo, check=False, env=jax)
    assert "TensorFlow is not installed here" in blocked.stderr  # so none of the above used it
    from brainmri.core.shards import ShardIndex
    from brainmri.model.models import class_probabilities, load_model

    model, _ = load_model(repo / "models")  # this process runs TensorFlow
    assert not any(layer.name.startswith("random_") for layer in model.layers)
    images, _, _ = ShardIndex.load(repo / "data" / "prepared").arrays("test")
    np.testing.assert_allclose(class_probabilities(model, images), np.load(under_jax), atol=1e-4)
    # The rest of the pipeline with KERAS_BACKEND=jax still set: Grad-CAM on JAX, export on TensorFlow (TFLite).
    explained = run(["dvc", "repro"], repo, env={"KERAS_BACKEND": "jax"})
    assert sorted(stages_run(explained.stdout)) == ["export", "gradcam", "model_card"]
    assert json.loads((repo / figures_file("gradcam")).read_text())["images"] == 4
    back_to_baseline(repo)


def test_yolo_layout_runs_end_to_end_and_grad_cam_is_scored_against_the_boxes(tmp_path):
    repo = create_project(tmp_path / "yolo-project")
    source = tmp_path / "scanner-exports" / "yolo"  # outside the project, named by absolute path
    for folder in ("images/train", "labels/train"):
        (source / folder).mkdir(parents=True)
    for class_index, (cx, cy) in enumerate([(0.3, 0.3), (0.7, 0.3)]):  # the blob's place in synthetic_image
        for variant in range(12):
            synthetic_image(class_index, variant).save(source / "images" / "train" / f"{class_index}_{variant}.png")
            (source / "labels" / "train" / f"{class_index}_{variant}.txt").write_text(
                f"{class_index} {cx} {cy} 0.25 0.25\n"
            )
    update_params(repo / "params.yaml", {"ingest": {"source": str(source), "classes": ["left", "right"]}})
    run(["git", "commit", "-qam", "yolo data"], repo)
    assert stages_run(run(["dvc", "repro"], repo).stdout) == ALL_STAGES
    # No machine path in what a run shares: files are named relative to the source, which
    # appears only as given (params.yaml, dvc.lock, the ingest.source param).
    shared = [*(repo / "data" / "interim").glob("*.csv"), *(repo / "metrics").rglob("*.*"), repo / "MODEL_CARD.md"]
    shared += [
        *(repo / "reports").rglob("*.csv"),
        *(repo / "reports").rglob("*.json"),
        *(repo / "mlartifacts").rglob("*.csv"),
    ]
    assert [path for path in shared if str(source) in path.read_text(errors="ignore")] == []
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for logged in client.search_runs([client.get_experiment_by_name("brain-mri").experiment_id]):
        assert [k for k, v in logged.data.params.items() if str(source) in v] in ([], ["ingest.source"])
    manifest = (repo / "data" / "interim" / "manifest.csv").read_text()
    assert "0 0.3 0.3 0.25 0.25" in manifest and (repo / "reports" / "data" / "samples.png").is_file()
    gradcam = json.loads((repo / figures_file("gradcam")).read_text())
    test_images = json.loads((repo / figures_file("split")).read_text())["test.total"]
    assert gradcam["images"] == 4 and gradcam["boxes.images"] == gradcam["faithfulness.images"] == test_images
    assert 0.0 <= gradcam["boxes.pointing_game"] <= 1.0 and 0.0 <= gradcam["boxes.box_iou"] <= 1.0
    assert (
        gradcam["boxes.pointing_game_ci_low"]
        <= gradcam["boxes.pointing_game"]
        <= gradcam["boxes.pointing_game_ci_high"]
    )
    assert {"faithfulness.deletion_auc", "faithfulness.insertion_auc_random"} <= set(gradcam)

    # An annotated folder in the other YOLO layout, a label file beside each image, is scored too.
    annotated = tmp_path / "annotated"
    for class_index, (name, (cx, cy)) in enumerate([("left", (0.3, 0.3)), ("right", (0.7, 0.3))]):
        (annotated / name).mkdir(parents=True)
        for variant in range(100, 103):
            synthetic_image(class_index, variant).save(annotated / name / f"{variant}.png")
            (annotated / name / f"{variant}.txt").write_text(f"7 {cx} {cy} 0.25 0.25\n")
    update_params(repo / "params.yaml", {"gradcam": {"annotated": str(annotated)}})
    result = run(["dvc", "repro"], repo)
    assert (
        stages_run(result.stdout) == ["validate", "gradcam", "model_card"]
        and "annotated images (uniform heatmap" in result.stdout
    )
    gradcam = json.loads((repo / figures_file("gradcam")).read_text())
    assert gradcam["annotated.images"] == 6 and gradcam["annotated.box_share"] == pytest.approx(1 / 16, rel=0.3)
    assert 0.0 <= gradcam["annotated.pointing_game.left"] <= 1.0
    assert gradcam["annotated.baseline_centre.pointing_game"] == 0.0  # the blobs are off centre
    assert -1.0 <= gradcam["annotated.occlusion_drop"] <= 1.0 and "annotated.occlusion_drop_elsewhere.left" in gradcam
    assert (repo / "reports" / "gradcam" / "annotated_right.png").is_file()


def test_scanner_files_run_end_to_end_with_patients_apart_and_no_identifier_anywhere(tmp_path):
    repo = create_project(tmp_path / "scanner-project")
    source = tmp_path / "archive"
    for patient in range(8):  # the folder of the first patients is named after them, as archives do
        folder = source / ("left" if patient < 4 else "right") / f"ZZQFOLDER{patient}" / "series"
        write_dicom_series(folder, f"p{patient}", int(patient >= 4), 5, first_variant=10 * patient)
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        shutil.copy(get_testdata_file(name), source / "left" / name)  # one slice, four encodings: duplicates
    shutil.copy(Path(nibabel_data) / "anatomical.nii", source / "right" / "volume.nii")
    shutil.copy(Path(nibabel_data) / "example4d.nii.gz", source / "right" / "series.nii.gz")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), source / "right" / "broken")
    update_params(
        repo / "params.yaml",
        {
            "ingest": {"source": str(source), "hash_paths": True, "nifti": {"slices": "middle", "middle": 5}},
            "gradcam": {"num_images": 2},
        },
    )
    run(["git", "commit", "-qam", "scanner data"], repo)
    env = {"BRAINMRI_KEY_SALT": "pipeline test"}
    result = run(["dvc", "repro"], repo, env=env)
    assert stages_run(result.stdout) == ALL_STAGES

    manifest = pd.read_csv(repo / "data" / "interim" / "manifest.csv", keep_default_na=False)
    assert len(manifest) == 8 * 5 + 4 + 5 + 5  # a row per slice
    assert manifest["path"].str.fullmatch(r"[0-9a-f]{16}#\d+").all()  # ingest.hash_paths
    sizes = manifest.groupby(["width", "height"]).size().to_dict()
    assert sizes == {(48, 48): 40, (64, 64): 4, (33, 41): 5, (128, 96): 5}  # DICOM, bundled MR, the two volumes
    assert manifest["patient"].str.fullmatch(r"[0-9a-f]{16}").all() and manifest["patient"].nunique() == 11
    rejects = (repo / "data" / "interim" / "rejects.csv").read_text()
    assert rejects.count("\n") == 2 and "cannot decode the pixel data" in rejects
    split = json.loads((repo / figures_file("split")).read_text())
    assert split["patients_in_several_splits"] == 0 and split["patients.test"] >= 2
    assert split["groups.train"] == split["patients.train"]
    assert (repo / figures_file("evaluate")).is_file() and (repo / "MODEL_CARD.md").is_file()

    # Nothing identifying anywhere: outputs, DVC's cache, the MLflow store and artifacts, the log.
    planted = [*PLANTED.values(), "ZZQFOLDER", "CompressedSamples", "4MR1"]  # the last two: MR_small's own
    written = [path for path in repo.rglob("*") if path.is_file() and ".git" not in path.parts]
    written = [path for path in written if path.parts[len(repo.parts)] not in ("src", "stages")]
    leaks = [(str(path), value) for path in written for value in planted if value.encode() in path.read_bytes()]
    assert leaks == [] and not [value for value in planted if value in result.stdout + result.stderr]
    assert stages_run(run(["dvc", "repro"], repo, env=env).stdout) == []
