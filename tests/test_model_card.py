from brainmri.core.intended_use import NOT_A_MEDICAL_DEVICE
from brainmri.core.params import Params
from brainmri.model.champion import Standing, untracked_standing
from brainmri.model.model_card import Provenance, render_model_card

CLASSES = ["glioma", "pituitary"]
CHAMPION = Standing("brain-mri-classifier", "3", "3", "brain-mri-classifier: version 3 is the champion")


def render(params: Params, metrics: dict[str, dict], layout: str, standing: Standing = CHAMPION) -> str:
    provenance = Provenance(
        "compact_cnn@sha256:0123456789ab",
        "abcdef1 + uncommitted changes",
        "2026-12-05",
        {"glioma": (0.8, 0.95)},
        standing.as_dict(),
    )
    return render_model_card(params, metrics, layout, provenance)


def run_metrics(**extra_evaluate) -> dict[str, dict]:
    evaluate = {
        "accuracy": 0.9,
        "accuracy_ci_low": 0.85,
        "accuracy_ci_high": 0.94,
        "macro_f1": 0.88,
        "macro_f1_ci_low": 0.8,
        "macro_f1_ci_high": 0.93,
        "ece": 0.05,
        "ece_bins": 15,
        "review_threshold": 0.8,
        "review_fraction": 0.1,
        "accuracy_accepted": 0.95,
        "roc_auc_macro": None,  # undefined: written as null
        "uncalibrated.ece": 0.12,
        "temperature": 1.8,
        **{f"{key}.{c}": value for c in CLASSES for key, value in (("support", 20), ("f1", 0.9), ("recall", 0.8))},
        **extra_evaluate,
    }
    split = {f"{s}.{c}": n for s, n in (("train", 50), ("val", 10), ("test", 20)) for c in CLASSES}
    return {
        "ingest": {"images": 170, "rejected": 3},
        "dedup": {"exact_duplicates_removed": 4, "near_duplicates_removed": 6},
        "split": {**split, "train.total": 100, "val.total": 20, "test.total": 40, "leaked_test_images_removed": 0},
        "balance": {"train.glioma": 60, "train.pituitary": 60, "train.augmented": 20},
        "train": {"best_epoch": 7, "epochs_run": 12},
        "evaluate": evaluate,
        "gradcam": {"annotated.images": 30, "annotated.pointing_game": 0.4, "annotated.pointing_game.glioma": 0.5,
                    "annotated.pointing_game_ci_low": 0.25, "annotated.pointing_game_ci_high": 0.55,
                    "annotated.baseline_centre.pointing_game": 0.2, "annotated.occlusion_drop": 0.3,
                    "annotated.occlusion_drop.glioma": 0.5, "annotated.occlusion_drop_elsewhere": 0.01,
                    "annotated.occlusion_drop_elsewhere.glioma": 0.02},
    }  # fmt: skip


def test_the_card_has_every_section_with_intervals_from_the_metrics():
    params = Params.model_validate({"ingest": {"source": "/somewhere/private/Training"}})
    card = render(params, run_metrics(), "folder-per-class")
    for heading in ("## Intended use", "## Model details", "## Training data", "## Evaluation on the test split",
                    "## Explanations (Grad-CAM)", "## Limitations"):  # fmt: skip
        assert heading in card
    assert NOT_A_MEDICAL_DEVICE in card
    assert "| accuracy | 0.900 [0.850, 0.940] |" in card and "| macro-F1 | 0.880 [0.800, 0.930] |" in card
    assert "| ROC AUC, macro one-vs-rest | n/a |" in card
    assert "0.050, 0.120 before temperature scaling (T = 1.80" in card
    assert "| glioma | 50 | 10 | 20 |" in card and "| total | 100 | 20 | 40 |" in card
    assert "40 held-out images" in card and "Best epoch 7 of 12" in card
    assert "0.400 [0.250, 0.550] of them (glioma 0.50)" in card
    assert "point at the tumour on only 0.40" in card  # the limitation follows the measurement
    assert "probability by 0.300 on average, a box of the same size elsewhere by 0.010: glioma 0.50" in card
    assert "`Training`" not in card and "/somewhere/private" not in card  # no machine path, not even the folder
    assert "External test set" not in card
    assert "(from scratch)" in card and "rotation 10, shift 0.1, zoom 0.2, flip;" in card
    assert "one class per folder" in card and "set to 60 images per class, 20 augmented copies added." in card
    assert "temperature scaling |" not in card  # it lowered the test ECE: no warning
    assert "**Localisation supervision:** labels only (no box supervision)." in card


def test_the_card_counts_the_boxed_images_that_trained_the_model():
    metrics = run_metrics()
    metrics["balance"].update({"train.boxed.glioma": 12, "train.boxed.pituitary": 30})
    params = Params.model_validate({"ingest": {"source": "data"}, "train": {"localisation": {"boxes": "/x/boxes"}}})
    card = render(params, metrics, "folder-per-class")
    assert (
        "energy loss on the class activation map (weight 1) for 42 training images with a tumour box "
        "(glioma 12, pituitary 30), boxes from the folder `boxes`." in card
    )
    rrr = Params.model_validate(
        {"ingest": {"source": "data"}, "train": {"localisation": {"loss": "rrr", "weight": 0.05}}}
    )
    assert "outside-the-box (RRR) penalty on the class activation map (weight 0.05) for 42" in render(
        rrr, metrics, "folder-per-class"
    )
    unsupervised = Params.model_validate({"ingest": {"source": "data"}, "train": {"localisation": {"loss": "none"}}})
    assert "labels only (no box supervision)" in render(unsupervised, metrics, "folder-per-class")


def test_an_external_set_gets_its_own_line():
    metrics = run_metrics(**{"external.images": 8, "external.leaked_removed": 1, "external.accuracy": 0.75,
                             "external.macro_f1": 0.7, "external.macro_f1_ci_low": 0.5,
                             "external.macro_f1_ci_high": 0.9})  # fmt: skip
    card = render(Params.model_validate({"ingest": {"source": "data"}}), metrics, "folder-per-class")
    assert "**External test set** (8 images; 1 removed as copies" in card and "macro-F1 0.700 [0.500, 0.900]" in card


def test_the_card_names_the_head_crop_cutmix_and_an_automatic_review_threshold():
    params = Params.model_validate({"ingest": {"source": "data"}, "train": {"crop": "head", "cutmix": 1.0}})
    card = render(params, run_metrics(review_threshold=0.93, review_target_accuracy=0.99), "yolo")
    assert "8-bit slices, cropped to the head, the longer side resized" in card
    assert "flip, CutMix (factor 1);" in card
    assert "flagged for review (under 0.930, chosen for 0.990 accuracy on the validation split)" in card


def test_the_card_says_how_labels_were_read_and_when_balance_undersamples():
    metrics = run_metrics()
    metrics["balance"] = {"train.glioma": 40, "train.pituitary": 40, "train.augmented": 0}
    params = Params.model_validate({"ingest": {"source": "data", "labels_csv": "labels.csv"}})
    card = render(params, metrics, "labels-csv")
    assert "labels from the table `labels.csv` (`ingest.labels_csv`)" in card and "one class per folder" not in card
    assert "set to 40 images per class, glioma, pituitary undersampled (`balance.target`)." in card
    assert "augmented copies" not in card
    yolo = render(params, metrics, "yolo")
    assert "YOLO images/ + labels/" in yolo and "one class per folder" not in yolo


def test_the_card_warns_when_temperature_scaling_was_refused_or_made_the_test_ece_worse():
    metrics = run_metrics(**{"uncalibrated.ece": 0.103, "ece": 0.116})
    card = render(Params.model_validate({"ingest": {"source": "data"}}), metrics, "folder-per-class")
    assert "**raised the test ECE** (0.103 → 0.116)" in card
    metrics["train"].update(temperature=1.0, temperature_fitted=1.6, val_ece_uncalibrated=0.08)
    card = render(Params.model_validate({"ingest": {"source": "data"}}), metrics, "folder-per-class")
    assert "not applied: T = 1.60 fitted on the validation split raised its ECE from 0.080" in card


def test_the_card_names_the_model_version_and_says_when_a_model_is_below_the_quality_floor():
    params = Params.model_validate({"ingest": {"source": "data"}})
    card = render(params, run_metrics(), "folder-per-class")
    assert "`compact_cnn@sha256:0123456789ab`, built on 2026-12-05 from commit `abcdef1 + uncommitted changes`" in card
    assert "| glioma | n/a | 0.800 | 0.900 [0.800, 0.950] |" in card  # per-class interval
    assert "**Not fit for use:** test macro-F1 0.880 is below the quality floor 0.900" in card
    lenient = Params.model_validate({"ingest": {"source": "data"}, "evaluate": {"quality_floor": 0.85}})
    assert "Not fit for use" not in render(lenient, run_metrics(), "folder-per-class")


def test_the_card_says_plainly_whether_the_model_is_the_champion():
    params = Params.model_validate({"ingest": {"source": "data"}})
    champion = render(params, run_metrics(), "folder-per-class")
    assert "**Champion:** version 3 of `brain-mri-classifier`, served as `models:/brain-mri-classifier@champion`" in (
        champion
    )
    why = "brain-mri-classifier: version 4 does not beat it: macro-F1 +0.004 [-0.010, +0.020] on 723 images"
    challenger = render(params, run_metrics(), "folder-per-class", Standing("brain-mri-classifier", "4", "3", why))
    assert "**Not the champion:** this is version 4 of `brain-mri-classifier`; `@champion` is version 3" in challenger
    assert "Champion:**" not in challenger and "+0.004 [-0.010, +0.020]" in challenger
    untracked = render(params, run_metrics(), "folder-per-class", untracked_standing("brain-mri-classifier"))
    assert "**Not registered:** not registered (tracking was off)" in untracked
