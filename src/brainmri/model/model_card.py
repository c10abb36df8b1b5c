"""MODEL_CARD.md, rendered from one run's params and metrics files.

The fields follow Google's model cards (Mitchell et al. 2019) and MONAI
bundles' model cards: details, intended use, data, evaluation with
intervals, explanations, limitations. Nothing here is typed by hand per
run, so the card always matches the committed `dvc.lock`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainmri.core.intended_use import NOT_A_MEDICAL_DEVICE
from brainmri.core.params import Params

SPLITS = ("train", "val", "test")


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _with_interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    interval = f" [{_number(low)}, {_number(high)}]" if low is not None and high is not None else ""
    return _number(metrics.get(key)) + interval


def _classes(evaluate: dict) -> list[str]:
    return sorted(key.split(".", 1)[1] for key in evaluate if key.startswith("support."))


def _balancing(split: dict, balance: dict, classes: list[str]) -> str:
    """What the balance stage did to the training split, from its counts before and after."""
    if not balance:
        return "the training split as split"
    added = int(balance.get("train.augmented", 0))
    reduced = [c for c in classes if balance.get(f"train.{c}", 0) < split.get(f"train.{c}", 0)]
    sizes = sorted({int(balance.get(f"train.{c}", 0)) for c in classes})
    parts = [f"the training split set to {'/'.join(map(str, sizes))} images per class"]
    if added:
        parts.append(f"{added} augmented copies added")
    if reduced:
        parts.append(f"{', '.join(reduced)} undersampled (`balance.target`)")
    return ", ".join(parts)


LOSS_NAMES = {"energy": "energy loss", "rrr": "outside-the-box (RRR) penalty"}


def _supervision(params: Params, balance: dict, classes: list[str]) -> str:
    """Which box term trained the model, on how many boxed images (balance's counts)."""
    boxed = {c: int(balance.get(f"train.boxed.{c}", 0)) for c in classes}
    if params.train.localisation.loss == "none" or not sum(boxed.values()):
        return "labels only (no box supervision)"
    per_class = ", ".join(f"{c} {n}" for c, n in boxed.items() if n)
    source = params.train.localisation.boxes
    return (
        f"{LOSS_NAMES[params.train.localisation.term]} on the class activation map "
        f"(weight {params.train.localisation.weight:g}) for "
        f"{sum(boxed.values())} training images with a tumour box ({per_class})"
        + (f", boxes from the folder `{Path(source).name}`" if source else "")
    )


def _phases(params: Params, train: dict) -> str:
    """The two phases of transfer learning, as they ran (metrics/train.json)."""
    if "epochs_fine_tuned" not in train:
        return ""
    f = params.train.fine_tune
    return (
        f"; transfer learning in two phases: {_number(train['epochs_frozen'])} epochs with the backbone frozen, "
        f"then {_number(train['epochs_fine_tuned'])} with its top {f.layers} layers unfrozen (batch norm frozen) "
        f"at learning rate {f.lr:g}"
    )


def _details(params: Params, balance_description: str, supervision: str, phases: str) -> list[str]:
    t = params.train
    head = f"global {t.pooling} pooling, dropout {t.dropout}, softmax (sigmoid for two classes)"
    augment = [k if v is True else f"{k} {v:g}" for k, v in t.augment.model_dump().items() if v not in (0, 0.0, False)]
    weights = "from scratch" if t.weights in (None, "none") else f"weights: {t.weights}"
    return [
        "## Model details",
        "",
        f"- **Architecture:** `{t.model}` ({weights}), {head}.",
        f"- **Input:** {t.image_size}×{t.image_size} {'grey' if t.channels == 1 else 'RGB'} 8-bit slices, "
        + ("cropped to the head, " if t.crop == "head" else "")
        + "the longer side resized and centred on a black square; scaling and normalisation are layers of the model.",
        f"- **Training:** AdamW, learning rate {t.lr} ({t.lr_schedule}), batch {t.batch_size}, up to {t.epochs} "
        f"epochs with early stopping (patience {t.early_stopping_patience}), label smoothing {t.label_smoothing}; "
        f"in-model augmentation: {', '.join(augment) or 'none'}"
        + (f", CutMix (factor {t.cutmix:g})" if t.cutmix else "")
        + phases
        + f"; {balance_description}.",
        f"- **Localisation supervision:** {supervision}.",
        f"- **Registered as** `{params.tracking.registered_model}` in MLflow's model registry.",
        "",
    ]


def _intended_use(threshold: float) -> list[str]:
    return [
        "## Intended use",
        "",
        f"**{NOT_A_MEDICAL_DEVICE}**",
        "",
        "- **For:** research and teaching on classifying 2D brain MRI slices; a reproducible baseline "
        "to compare models, data and training recipes against.",
        f"- **Human review:** predictions with a top-1 probability under {threshold} are flagged `needs_review`.",
        "- **Not for:** diagnosis, triage or treatment decisions; whole 3D studies; modalities, sequences or "
        "populations absent from the training data.",
        "",
    ]


LABEL_SOURCES = {
    "folder-per-class": "one class per folder",
    "split-folders": "split folders above one folder per class",
    "yolo": "YOLO images/ + labels/, the class of each image's first box named by `ingest.classes`",
    "labels-csv": "labels from the table `{labels_csv}` (`ingest.labels_csv`)",
}


def _data(params: Params, ingest: dict, dedup: dict, split: dict, classes: list[str], layout: str) -> list[str]:
    labels = LABEL_SOURCES.get(layout, "labels as ingest found them").format(labels_csv=params.ingest.labels_csv)
    lines = [
        "## Training data",
        "",
        f"- **Source:** the images under `ingest.source`, {labels}.",
        f"- **Images:** {_number(ingest.get('images'))} read, {_number(ingest.get('rejected'))} rejected; "
        f"{_number(dedup.get('exact_duplicates_removed'))} exact and "
        f"{_number(dedup.get('near_duplicates_removed'))} near copies removed, "
        f"{_number(dedup.get('conflicting_images_removed'))} with conflicting labels; "
        f"{_number(split.get('leaked_test_images_removed'))} test images removed as copies or patients of "
        "training images.",
        f"- **Split** (stratified, seed {params.split.seed}, {_kept_apart(split)} never across splits):",
        "",
        "| class | " + " | ".join(SPLITS) + " |",
        "| --- | " + " | ".join("---" for _ in SPLITS) + " |",
    ]
    for name in [*classes, "total"]:
        lines.append(f"| {name} | " + " | ".join(_number(split.get(f"{s}.{name}")) for s in SPLITS) + " |")
    return [*lines, ""]


def _kept_apart(split: dict) -> str:
    if "patients.train" in split:
        counts = ", ".join(f"{_number(split.get(f'patients.{name}'))} {name}" for name in SPLITS)
        return f"duplicate groups and patients ({counts})"
    return "duplicate groups"


def _evaluation(
    evaluate: dict, classes: list[str], train: dict, f1_intervals: dict[str, tuple[float, float]]
) -> list[str]:
    lines = [
        "## Evaluation on the test split",
        "",
        f"{_number(sum(evaluate.get(f'support.{c}', 0) for c in classes))} held-out images; "
        "95% percentile-bootstrap intervals over the images in brackets. Best epoch "
        f"{_number(train.get('best_epoch'))} of {_number(train.get('epochs_run'))} (validation loss).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {_with_interval(evaluate, 'accuracy')} |",
        f"| balanced accuracy | {_with_interval(evaluate, 'balanced_accuracy')} |",
        f"| macro-F1 | {_with_interval(evaluate, 'macro_f1')} |",
        f"| ROC AUC, macro one-vs-rest | {_number(evaluate.get('roc_auc_macro'))} |",
        f"| log loss | {_number(evaluate.get('log_loss'))} |",
        f"| expected calibration error ({evaluate.get('ece_bins')} bins) | {_number(evaluate.get('ece'))}"
        + (
            f", {_number(evaluate['uncalibrated.ece'])} before temperature scaling (T = "
            f"{_number(evaluate.get('temperature'), 2)}, fitted on the validation split)"
            if "uncalibrated.ece" in evaluate
            else ""
        )
        + " |",
        f"| flagged for review (under {_number(evaluate.get('review_threshold'))}"
        + (
            f", chosen for {_number(evaluate['review_target_accuracy'])} accuracy on the validation split"
            if "review_target_accuracy" in evaluate
            else ""
        )
        + ") | "
        f"{_number(evaluate.get('review_fraction'))}, accuracy on the rest {_number(evaluate.get('accuracy_accepted'))}"
        " |",
    ]
    lines += _calibration_warnings(evaluate, train)
    if "tta.macro_f1" in evaluate:
        lines.append(f"| macro-F1 with flip test-time augmentation | {_with_interval(evaluate, 'tta.macro_f1')} |")
    lines += ["", "| class | precision | recall | F1 [95% CI] | ROC AUC | images |", "|" + " --- |" * 6]
    for c in classes:
        low, high = f1_intervals.get(c, (None, None))
        interval = f" [{_number(low)}, {_number(high)}]" if low is not None else ""
        lines.append(
            f"| {c} | {_number(evaluate.get(f'precision.{c}'))} | {_number(evaluate.get(f'recall.{c}'))} | "
            f"{_number(evaluate.get(f'f1.{c}'))}{interval} | {_number(evaluate.get(f'roc_auc.{c}'))} | "
            f"{_number(evaluate.get(f'support.{c}'))} |"
        )
    if "external.images" in evaluate:
        lines += [
            "",
            f"**External test set** ({_number(evaluate.get('external.images'))} images; "
            f"{_number(evaluate.get('external.leaked_removed'))} removed as copies of the pipeline's images): accuracy "
            f"{_with_interval(evaluate, 'external.accuracy')}, "
            f"macro-F1 {_with_interval(evaluate, 'external.macro_f1')}.",
        ]
    return [*lines, ""]


def _calibration_warnings(evaluate: dict, train: dict) -> list[str]:
    """Rows that say when temperature scaling was refused on validation or did not help on test."""
    rows = []
    fitted, kept = train.get("temperature_fitted"), train.get("temperature")
    if fitted is not None and kept == 1.0 and fitted != 1.0:
        rows.append(
            f"| temperature scaling | not applied: T = {_number(fitted, 2)} fitted on the validation split raised "
            f"its ECE from {_number(train.get('val_ece_uncalibrated'))} "
            "(the split is too small to fit T reliably) |"
        )
    elif "uncalibrated.ece" in evaluate and evaluate["uncalibrated.ece"] < evaluate.get("ece", 0):
        rows.append(
            f"| temperature scaling | **raised the test ECE** ({_number(evaluate['uncalibrated.ece'])} → "
            f"{_number(evaluate.get('ece'))}): T fitted on the validation split does not carry over; "
            "read the probabilities with care |"
        )
    return rows


def _explanations(gradcam: dict, classes: list[str]) -> list[str]:
    lines = ["## Explanations (Grad-CAM)", ""]
    if "faithfulness.insertion_auc" in gradcam:
        lines.append(
            f"- **Faithfulness** on {_number(gradcam.get('faithfulness.images'))} test images: insertion AUC "
            f"{_number(gradcam['faithfulness.insertion_auc'])} against "
            f"{_number(gradcam.get('faithfulness.insertion_auc_random'))} for random pixels, deletion AUC "
            f"{_number(gradcam.get('faithfulness.deletion_auc'))} against "
            f"{_number(gradcam.get('faithfulness.deletion_auc_random'))}."
        )
    for prefix, what in (("annotated.", "the annotated folder"), ("boxes.", "the test split's boxes")):
        if f"{prefix}pointing_game" not in gradcam:
            continue
        per_class = ", ".join(
            f"{c} {_number(gradcam[f'{prefix}pointing_game.{c}'], 2)}"
            for c in classes
            if gradcam.get(f"{prefix}pointing_game.{c}") is not None
        )
        lines.append(
            f"- **Where the heatmaps point**, on {_number(gradcam.get(f'{prefix}images'))} slices of {what}: "
            f"the peak falls inside the tumour box on {_with_interval(gradcam, f'{prefix}pointing_game')} of them "
            f"({per_class}); a fixed point at the image centre scores "
            f"{_number(gradcam.get(f'{prefix}baseline_centre.pointing_game'), 2)}."
        )
    if "annotated.occlusion_drop" in gradcam:
        per_class = ", ".join(
            f"{c} {_number(gradcam[f'annotated.occlusion_drop.{c}'], 2)} (elsewhere "
            f"{_number(gradcam.get(f'annotated.occlusion_drop_elsewhere.{c}'), 2)})"
            for c in classes
            if gradcam.get(f"annotated.occlusion_drop.{c}") is not None
        )
        lines.append(
            "- **Does the prediction need the lesion?** Setting the tumour box to black lowers the true class's "
            f"probability by {_with_interval(gradcam, 'annotated.occlusion_drop')} on average, a box of the same "
            f"size elsewhere by {_number(gradcam.get('annotated.occlusion_drop_elsewhere'))}: {per_class}."
        )
    if len(lines) == 2:
        lines.append("- No explanation figures in this run.")
    return [*lines, ""]


def _limitations(gradcam: dict, split: dict) -> list[str]:
    if split.get("patients_in_several_splits") == 0:
        patients = "- Patient-level split: no patient has slices on two sides of the split."
    else:
        patients = (
            "- No patient-level split: data without patient keys is split by image and duplicate group, so "
            "neighbouring slices of one patient can sit on both sides (see `split.group_pattern`)."
        )
    lines = [
        "## Limitations",
        "",
        "- 2D slices, judged one at a time; no 3D context, no sequence or scanner metadata.",
        "- Trained and tested on one collection: the test split shares its sources, scanners and "
        "preprocessing with training, so these figures overstate performance elsewhere (score an external "
        "set with `evaluate.external`).",
        patients,
        "- Small test sets give wide intervals: compare runs by the intervals, not by bare numbers.",
    ]
    pointing = gradcam.get("annotated.pointing_game", gradcam.get("boxes.pointing_game"))
    if pointing is not None and pointing < 0.8:
        lines.append(
            f"- The heatmaps point at the tumour on only {_number(pointing, 2)} of annotated slices: the model can "
            "be right for reasons other than the lesion (the slice's anatomy and view). Do not read a heatmap "
            "as a localisation."
        )
    return [*lines, ""]


@dataclass(frozen=True)
class Provenance:
    """What the model_card stage finds beside the metrics: which model, built when and from what."""

    model_version: str  # as predict, serve and the audit trail name it
    commit: str  # the git commit the run started from, "+ uncommitted changes" where the tree differed
    built_on: str  # UTC date
    f1_intervals: dict[str, tuple[float, float]]  # per class, 95% bootstrap over the test images
    standing: dict  # the evaluate stage's verdict against @champion (brainmri.model.champion.Standing)


def _standing(standing: dict) -> str:
    name, version, champion = standing["registered_model"], standing["version"], standing["champion_version"]
    if version is None:
        return f"- **Not registered:** {standing['message']}."
    if standing["is_champion"]:
        return f"- **Champion:** version {version} of `{name}`, served as `models:/{name}@champion`."
    return (
        f"- **Not the champion:** this is version {version} of `{name}`; `@champion` is version {champion} "
        f"({standing['message']}). Serve `models:/{name}@champion` unless this model is the one to study."
    )


def _provenance(provenance: Provenance, evaluate: dict, floor: float) -> list[str]:
    lines = [
        f"- **Version:** `{provenance.model_version}`, built on {provenance.built_on} from commit "
        f"`{provenance.commit}`.",
        _standing(provenance.standing),
    ]
    macro_f1 = evaluate.get("macro_f1")
    if macro_f1 is not None and macro_f1 < floor:
        lines.append(
            f"- **Not fit for use:** test macro-F1 {_number(macro_f1)} is below the quality floor {_number(floor)} "
            "(`evaluate.quality_floor`). This model shows the pipeline working; it is not a model to use."
        )
    return [*lines, ""]


def render_model_card(params: Params, metrics: dict[str, dict], layout: str, provenance: Provenance) -> str:
    """The card as Markdown; `metrics` maps a stage name to its metrics/<stage>.json contents, and
    `layout` is the source layout ingest found (reports/data/report.json)."""
    evaluate, gradcam, split = metrics["evaluate"], metrics.get("gradcam", {}), metrics.get("split", {})
    balance = metrics.get("balance", {})
    classes = _classes(evaluate)
    lines = [
        f"# Model card: {params.tracking.registered_model}",
        "",
        f"A `{params.train.model}` classifier of brain MRI slices into {len(classes)} classes "
        f"({', '.join(classes)}). Written by the `model_card` stage from this run's params and metrics; "
        "`dvc repro` rebuilds it with every figure in it.",
        "",
        *_provenance(provenance, evaluate, params.evaluate.quality_floor),
        *_intended_use(evaluate.get("review_threshold", params.evaluate.review_threshold)),
        *_details(
            params,
            _balancing(split, balance, classes),
            _supervision(params, balance, classes),
            _phases(params, metrics.get("train", {})),
        ),
        *_data(params, metrics.get("ingest", {}), metrics.get("dedup", {}), split, classes, layout),
        *_evaluation(evaluate, classes, metrics.get("train", {}), provenance.f1_intervals),
        *_explanations(gradcam, classes),
        *_limitations(gradcam, split),
    ]
    return "\n".join(lines)
