"""Benchmark: the whole pipeline on the full dataset with default params.

    python benchmarks/full_data_accuracy.py SOURCE [--annotated FOLDER] [--set KEY=VALUE ...]

Clones the committed HEAD into a temporary folder, points `ingest.source` at
SOURCE (a folder per class, e.g. the Kaggle training split), optionally
overrides params (`--set train.epochs=20`, as `dvc exp run -S` would; like the
README's full-data command it trains with `train.deterministic=false`), runs
`dvc repro` and reports its wall time with the test-split metrics (the
pipeline's own deduplicated test split), the epochs run and the seconds per
epoch. With `--annotated`, the gradcam stage also scores the heatmaps against
that folder's boxes (`gradcam.annotated`) and the pointing game per class,
its intervals, the two baselines and the faithfulness figures are reported.
Prints one JSON line; the README's results section comes from it.

With `--supervise FOLDER` (class folders of `<n>.jpg` + YOLO `<n>.txt`, file
numbers running along each patient's slices, as in the shared annotated
slices) the last `--holdout` share of each class's file numbers is kept out:
the files before the cut, less a gap of ten numbers, become
`train.localisation.boxes` (set `train.localisation.loss` too), and the
held-out block becomes `gradcam.annotated`, so the localisation figures come
from patients whose boxes never trained. Without `train.localisation.loss`
the same block scores a labels-only model.

With `--reuse WORKSPACE` (one kept by an earlier `--keep` run on the same
SOURCE) the data, split and shards already there are reused: the committed
code and params (with `--set`) are written into it and only validate,
train, evaluate and gradcam run (`dvc repro -s`), so `--set` may change
only train, evaluate and gradcam params. The line then reports that
stage time and the commit the reused data were prepared with. Adding
`--model FOLDER` (a copy of a kept workspace's `models/`, `metrics/` and `reports/figures/`)
scores that trained model instead of training one: only evaluate and
gradcam run, e.g. a labels-only model on the held-out block of `--supervise`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from brainmri.core.paths import TRAIN_HISTORY, figures_file, metrics_file

REPO = Path(__file__).resolve().parents[1]
# The stages --reuse reruns, and the params sections they alone read.
REUSED_STAGES = ("validate", "boxes", "balance", "train", "evaluate", "gradcam")
REUSABLE_SECTIONS = ("train", "evaluate", "gradcam")
# Numbers left out on either side of the cut: the patient a cut splits has its slices there.
CUT_GAP = 10


def dataset_path(path: str | Path) -> str:
    """A data folder as results files record it: its name under its parent's (e.g.
    `brain-tumor-mri/Training`), never one machine's absolute path."""
    resolved = Path(path).resolve()
    return f"{resolved.parent.name}/{resolved.name}"


def set_param(params: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *sections, leaf = key.split(".")
    target = params
    for section in sections:
        target = target[section]
    target[leaf] = yaml.safe_load(value)


def split_annotated(folder: Path, holdout: float, work: Path) -> tuple[Path, Path]:
    """Copy each class's files of `folder` into a supervision block (the lower file numbers) and a
    held-out block (the top `holdout` share), CUT_GAP numbers apart; the two folders."""
    blocks = (work / "boxes_supervision", work / "boxes_holdout")
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        numbers = sorted(int(p.stem) for p in class_folder.glob("*.jpg") if p.stem.isdigit())
        cut = numbers[int(len(numbers) * (1 - holdout))]
        for number in numbers:
            block = blocks[0] if number < cut - CUT_GAP else blocks[1] if number >= cut + CUT_GAP else None
            if block is None:
                continue
            (block / class_folder.name).mkdir(parents=True, exist_ok=True)
            for suffix in (".jpg", ".txt"):
                # copies: ingest's checks refuse links
                shutil.copyfile(class_folder / f"{number}{suffix}", block / class_folder.name / f"{number}{suffix}")
    return blocks


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def checkout_into_kept(repo: Path, source: str, assignments: list[str]) -> str:
    """Write the committed code and params into a kept workspace; the commit its data came from.

    The earlier stages are not rerun, so their params must be those the data
    were prepared with: the same source, and overrides of later stages only."""
    if not (repo / "dvc.lock").is_file():
        sys.exit(f"--reuse: {repo.parent} is not a workspace kept by --keep (no repo/dvc.lock)")
    kept_source = yaml.safe_load((repo / "params.yaml").read_text())["ingest"]["source"]
    if kept_source != str(Path(source).resolve()):
        sys.exit(f"--reuse: the kept workspace was prepared from {kept_source}, not {source}")
    for assignment in assignments:
        if not assignment.startswith(tuple(f"{section}." for section in REUSABLE_SECTIONS)):
            sys.exit(f"--reuse: --set {assignment} changes a stage that is not rerun; run without --reuse")
    subprocess.run(["git", "fetch", "-q", str(REPO), "HEAD"], cwd=repo, check=True)
    code = ["src", "stages", "dvc.yaml", "params.yaml"]
    subprocess.run(["git", "checkout", "-q", "FETCH_HEAD", "--", *code], cwd=repo, check=True)
    return git_head(repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images (one folder per class)")
    parser.add_argument("--annotated", help="folder of box-annotated slices for gradcam.annotated")
    parser.add_argument("--supervise", type=Path, help="box-annotated slices: supervision and held-out blocks")
    parser.add_argument("--holdout", type=float, default=0.3, help="share of each class's slices held out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and print its path")
    parser.add_argument(
        "--reuse", type=Path, metavar="WORKSPACE", help="rerun train and later stages in a kept workspace"
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="FOLDER",
        help="with --reuse: score this copy of a workspace's training outputs, no training",
    )
    args = parser.parse_args()
    if args.model and not args.reuse:
        sys.exit("--model needs --reuse: the data it is scored on come from a kept workspace")

    work = args.reuse or Path(tempfile.mkdtemp(prefix="full-data-"))
    try:
        if args.reuse:
            data_commit = checkout_into_kept(work / "repo", args.source, args.set)
        else:
            subprocess.run(["git", "clone", "-q", str(REPO), str(work / "repo")], check=True)
        repo = work / "repo"
        commit = git_head(REPO)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["ingest"]["source"] = str(Path(args.source).resolve())
        if args.annotated:
            params["gradcam"]["annotated"] = str(Path(args.annotated).resolve())
        if args.supervise:
            supervision, holdout = split_annotated(args.supervise.resolve(), args.holdout, work)
            params["train"]["localisation"]["boxes"] = str(supervision)
            params["gradcam"]["annotated"] = str(holdout)
        for assignment in ["train.deterministic=false", *args.set]:  # float32/bfloat16, as users train it
            set_param(params, assignment)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo / "src"),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        stages = REUSED_STAGES
        if args.model:
            shutil.rmtree(repo / "models")
            shutil.copytree(args.model / "models", repo / "models")
            for output in (figures_file("train"), metrics_file("train"), TRAIN_HISTORY):
                shutil.copyfile(args.model / output, repo / output)
            stages = tuple(stage for stage in REUSED_STAGES if stage != "train")
        start = time.perf_counter()
        for command in [["dvc", "repro", "-s", stage] for stage in stages] if args.reuse else [["dvc", "repro"]]:
            result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        wall = time.perf_counter() - start
        evaluate = json.loads((repo / figures_file("evaluate")).read_text())
        train = json.loads((repo / figures_file("train")).read_text())
        with open(repo / TRAIN_HISTORY) as handle:
            epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
        counts = json.loads((repo / "data" / "prepared" / "index.json").read_text())["counts"]
        gradcam = json.loads((repo / figures_file("gradcam")).read_text())
        boxes = json.loads((repo / figures_file("boxes")).read_text())
        explanations = {
            key: value
            for key, value in gradcam.items()
            if key.startswith("faithfulness.")
            or key.startswith(("annotated.pointing_game", "annotated.energy_in_box", "annotated.box_share"))
            or key.startswith(("annotated.baseline_uniform.pointing_game", "annotated.baseline_centre.pointing_game"))
            or key.startswith(("annotated.occlusion_drop", "annotated.occlusion_drop_elsewhere"))
            or key in ("annotated.images", "annotated.accuracy")
        }
        print(
            json.dumps(
                {
                    "commit": commit,
                    "source": dataset_path(args.source),
                    "overrides": args.set,
                    **({"scored_model": Path(args.model).name} if args.model else {}),
                    **(
                        {"reused_data_commit": data_commit, "train_evaluate_gradcam_wall_s": round(wall)}
                        if args.reuse
                        else {"repro_wall_s": round(wall)}
                    ),
                    "test_images": sum(counts["test"].values()),
                    "train_images_per_epoch": sum(counts["train"].values()),
                    "accuracy": evaluate["accuracy"],
                    "macro_f1": evaluate["macro_f1"],
                    "balanced_accuracy": evaluate["balanced_accuracy"],
                    "per_class_f1": {key[3:]: value for key, value in evaluate.items() if key.startswith("f1.")},
                    **{key: value for key, value in evaluate.items() if key in ("tta.accuracy", "tta.macro_f1")},
                    "epochs_run": train["epochs_run"],
                    "best_epoch": train["best_epoch"],
                    "median_epoch_s": round(sorted(epoch_seconds)[len(epoch_seconds) // 2], 1),
                    **({f"boxes.{key}": value for key, value in boxes.items()} if args.supervise else {}),
                    **explanations,
                    "date": date.today().isoformat(),
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                }
            )
        )
    finally:
        if args.keep or args.reuse:
            print(f"workspace kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
