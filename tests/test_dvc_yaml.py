"""dvc.yaml declares what each stage really reads, so DVC's cache is never stale."""

import ast
import json
from pathlib import Path

import yaml

from brainmri.core.metrics import HEADLINE, write_figures
from brainmri.core.params import IngestParams
from brainmri.core.paths import STAGE_OUTPUTS, figures_file, metrics_file

from helpers import PROJECT

STAGES = ["ingest", "dedup", "split", "boxes", "balance", "train", "evaluate", "gradcam", "model_card", "export"]
# Stages with no params section of their own: they only read upstream ones.
READERS = {"model_card"}
INGEST_READERS = {"boxes", "evaluate", "gradcam"}
# Stages whose own param is part of the training recipe: train.localisation.boxes.
TRAIN_KEYED = {"boxes"}
VALIDATED = "data/interim/params.validated"


def package_imports(path: Path) -> set[str]:
    """brainmri modules a file imports, followed transitively through the package."""
    found: set[str] = set()
    pending = [path]
    while pending:
        tree = ast.parse(pending.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brainmri"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("brainmri")]
            for name in names:
                module = PROJECT / "src" / (name.replace(".", "/") + ".py")
                if module.is_file() and module not in found:
                    found.add(module)
                    pending.append(module)
    return {m.relative_to(PROJECT).as_posix() for m in found if m.name != "__init__.py"}


def test_stages_are_in_dag_order_and_declare_every_module_they_import():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["validate", *STAGES]
    for name in ["validate", *STAGES]:
        script = f"stages/{name}.py"
        deps = set(stages[name]["deps"])
        assert stages[name]["cmd"] == f"python {script}" and script in deps
        imported = package_imports(PROJECT / script)
        declared = {dep for dep in deps if dep.startswith("src/")}
        assert not imported - declared, f"stage '{name}' imports {sorted(imported - declared)}, undeclared"
        assert not declared - imported, f"stage '{name}' declares {sorted(declared - imported)}, never imported"


def test_stages_declare_only_their_own_params_sections():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        sections = {entry.split(".")[0] for entry in stages[name]["params"]}
        assert name in sections or name in READERS or (name in TRAIN_KEYED and "train" in sections)
        upstream = set(STAGES[: STAGES.index(name)])
        assert sections - {name} <= upstream | {"train", "tracking"}, f"{name} reads downstream params {sections}"
    assert stages["ingest"]["params"] == ["ingest"]


def test_every_stage_waits_for_the_params_check():
    # DVC deletes a stage's outputs before running it: a bad params.yaml must fail before that.
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert "params.yaml" in stages["validate"]["deps"]
    assert stages["validate"]["outs"] == [{VALIDATED: {"persist": True}}]
    for name in STAGES:
        assert VALIDATED in stages[name]["deps"], name


def declared_outputs(stage: dict) -> set[str]:
    entries = stage.get("outs", []) + stage.get("metrics", [])
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def test_every_stage_writes_exactly_the_outputs_brainmri_paths_names():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_OUTPUTS)
    for name, stage in stages.items():
        assert declared_outputs(stage) == {path.as_posix() for path in STAGE_OUTPUTS[name]}, name


def test_only_ingest_depends_on_the_source_path_and_readers_declare_every_other_ingest_key():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    other_keys = {f"ingest.{key}" for key in IngestParams.model_fields} - {"ingest.source"}
    for name, stage in stages.items():
        declared = {entry for entry in stage.get("params", []) if entry.split(".")[0] == "ingest"}
        if name == "ingest":
            continue
        assert "ingest" not in declared and "ingest.source" not in declared, name  # moved data rebuilds nothing
        assert declared <= other_keys, name
        if name in INGEST_READERS:  # they read other folders with ingest's options
            assert declared == other_keys, f"{name} lacks {sorted(other_keys - declared)}"


def test_the_metrics_file_holds_the_headline_figures_and_the_figures_file_all_of_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    headline = {"accuracy": 0.9, "macro_f1": 0.9, "macro_f1_ci_low": 0.8, "macro_f1_ci_high": 0.95, "ece": 0.02}
    headline |= {"f1.glioma": 0.9, "f1.notumor": 1.0}
    figures = headline | {"log_loss": 0.3, "tta.macro_f1": 0.91, "roc_auc.glioma": 0.99, "balanced_accuracy": 0.9}
    write_figures("evaluate", figures | {"ece": 0.0234567891})
    assert json.loads(figures_file("evaluate").read_text()) == figures | {"ece": 0.0234567891}
    # Headline figures stop at 4 decimals, short of the float32 digits in which two CPUs may differ.
    assert json.loads(metrics_file("evaluate").read_text()) == headline | {"ece": 0.0235}
    pointing = {"annotated.pointing_game": 0.5, "annotated.pointing_game_ci_low": 0.4, "annotated.pointing_game.a": 0.6}
    write_figures("gradcam", pointing | {"annotated.pointing_game_ci_low.a": 0.5, "annotated.energy_in_box": 0.2})
    assert json.loads(metrics_file("gradcam").read_text()) == pointing
    write_figures("ingest", {"images": 3})
    assert json.loads(figures_file("ingest").read_text()) == {"images": 3} and not metrics_file("ingest").exists()


def test_dvc_declares_as_metrics_exactly_the_stages_with_headline_figures():
    declared = {
        name: [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get("metrics", [])]
        for name, stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].items()
    }
    assert {name: files for name, files in declared.items() if files} == {
        stage: [metrics_file(stage).as_posix()] for stage in HEADLINE
    }
