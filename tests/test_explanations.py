"""The gradcam stage's explanations of a test sample and of box-annotated slices, without dvc repro."""

from brainmri.core.params import GradcamParams, Params, TrainParams
from brainmri.explain.explanations import caption, explain_annotated, explain_test_sample
from brainmri.explain.gradcam import last_feature_map_layer
from brainmri.model.models import model_from_params

from helpers import CLASSES, make_dataset, write_prepared_data


def tiny_model():
    model = model_from_params(TrainParams(image_size=32, width=4), num_classes=len(CLASSES))
    return model, last_feature_map_layer(model)


def test_a_test_sample_is_drawn_per_class_and_scored_against_its_boxes(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"test": [3, 3, 3, 3]}, box=(4.0, 4.0, 20.0, 20.0))
    model, layer = tiny_model()
    p = GradcamParams(num_images=4, faithfulness_images=6, faithfulness_steps=4)

    summary = explain_test_sample(model, CLASSES, p, layer, index, tmp_path / "out")

    assert summary["images"] == 4 and summary["faithfulness.images"] == 6
    assert 0.0 <= summary["energy_in_brain"] <= 1.0
    # Every tumour class carries a box; notumor has none.
    assert {"boxes.pointing_game.glioma", "boxes.pointing_game.pituitary"} <= set(summary)
    assert "boxes.pointing_game.notumor" not in summary
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 4
    assert sorted(path.name for path in (tmp_path / "out").glob("grid_*.png")) == [f"grid_{c}.png" for c in CLASSES]


def test_annotated_slices_are_scored_with_occlusion_and_drawn(tmp_path):
    root = make_dataset(tmp_path / "annotated", per_class=2, classes=["glioma", "pituitary"], size=32)
    for name in ("glioma/glioma_000.jpg", "pituitary/pituitary_001.png"):
        (root / name).with_suffix(".txt").write_text("0 0.5 0.5 0.25 0.25\n")
    params = Params.model_validate(
        {"ingest": {"source": "unused"}, "gradcam": {"annotated": str(root), "num_images": 2}}
    )
    model, layer = tiny_model()
    meta = {"image_size": 32, "channels": 1}

    summary = explain_annotated(model, CLASSES, meta, params, layer, tmp_path / "out")

    assert summary["annotated.images"] == 2 and summary["annotated.unboxed"] == 2
    assert {"annotated.pointing_game", "annotated.occlusion_drop.glioma", "annotated.accuracy"} <= set(summary)
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == [
        "annotated_glioma.png",
        "annotated_pituitary.png",
    ]


def test_captions_mark_mistakes_and_flat_heatmaps():
    assert caption("a/b/scan.png", "glioma", "glioma", 0.91, False) == "scan.png\ntrue glioma, predicted glioma (0.91)"
    marked = caption("scan.png", "glioma", "pituitary", 0.5, True)
    assert marked.endswith("MISCLASSIFIED  [flat heatmap]")
