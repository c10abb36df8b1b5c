import keras
import numpy as np
import pytest
from PIL import Image

from brainmri.core.errors import DataError
from brainmri.core.images import box_rectangles, rectangles_mask
from brainmri.core.params import IngestParams
from brainmri.data.ingest import scan
from brainmri.explain.localisation import (
    baseline_heatmap,
    deletion_insertion,
    energy_inside,
    heatmap_iou,
    lesion_occlusion,
    load_annotated_set,
    pointing_score,
    score_against_boxes,
    summarise_box_scores,
    summarise_occlusion,
)
from brainmri.model.models import class_probabilities

from helpers import make_dataset


def test_energy_pointing_and_iou_by_hand():
    heatmap = np.zeros((10, 10))
    heatmap[2:4, 2:4] = 1.0  # 4 hot pixels
    heatmap[8, 8] = 0.5
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:5, 0:5] = True
    assert energy_inside(heatmap, mask) == pytest.approx(4 / 4.5)
    assert pointing_score(heatmap, mask) == 1.0
    # hot (>= half the peak): the 4 pixels in the box and the 0.5 outside; union 25 + 1
    assert heatmap_iou(heatmap, mask) == pytest.approx(4 / 26)
    assert np.isnan(energy_inside(np.zeros((10, 10)), mask))
    heatmap[9, 9] = 2.0  # the peak moves out of the box
    assert pointing_score(heatmap, mask) == 0.0


def test_tied_peaks_score_their_share_inside_the_box():
    heatmap = np.zeros((4, 4))
    heatmap[0, 0] = heatmap[3, 3] = 1.0
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert pointing_score(heatmap, mask) == 0.5


def test_baselines_by_hand():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:5, 0:4] = True  # 20% of the image, away from the centre
    uniform = baseline_heatmap("uniform", 10)
    assert pointing_score(uniform, mask) == pytest.approx(0.2)
    assert energy_inside(uniform, mask) == pytest.approx(0.2)
    assert heatmap_iou(uniform, mask) == pytest.approx(0.2)
    centre = baseline_heatmap("centre", 10)
    assert np.argwhere(centre).tolist() == [[4, 4], [4, 5], [5, 4], [5, 5]]
    assert pointing_score(centre, mask) == 0.0 and energy_inside(centre, mask) == 0.0
    mask[3:7, 3:7] = True  # now the box covers the centre
    assert pointing_score(centre, mask) == 1.0 and energy_inside(centre, mask) == 1.0
    assert np.argwhere(baseline_heatmap("centre", 9)).tolist() == [[4, 4]]


def test_yolo_boxes_land_where_the_model_sees_them():
    # A 200x100 image is padded to 200x200 (50 px bands above and below), then resized to 20.
    # Box: x 80..120, y 30..70 (+50 padding = 80..120) -> pixels 8..11 on both axes at 1/10 scale.
    assert box_rectangles("0 0.5 0.5 0.2 0.4", 200, 100, 20) == [pytest.approx((8, 8, 12, 12))]
    mask = rectangles_mask(box_rectangles("0 0.5 0.5 0.2 0.4", width=200, height=100, size=20), 20)
    rows, columns = np.nonzero(mask)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (8, 11, 8, 11)
    assert not rectangles_mask(box_rectangles("", 200, 100, 20), 20).any()


def test_scores_per_class_with_intervals_and_baselines():
    size = 10
    mask = np.zeros((size, size), dtype=bool)
    mask[0:5, 0:5] = True  # a quarter of the image, holding one of the four centre pixels
    inside, outside = np.zeros((size, size)), np.zeros((size, size))
    inside[1, 1] = outside[8, 8] = 1.0
    heatmaps = np.stack([inside, inside, outside, inside, np.zeros((size, size))])
    flat = np.array([False, False, False, False, True])
    labels = ["a", "a", "a", "b", "b"]
    scores = score_against_boxes(heatmaps, flat, np.stack([mask] * 5), labels)
    assert scores["pointing_game"].tolist() == [1, 1, 0, 1, 0]  # the flat heatmap points nowhere
    summary = summarise_box_scores(scores, "annotated.")
    assert summary["annotated.images"] == 5
    assert summary["annotated.pointing_game"] == pytest.approx(0.6)
    assert summary["annotated.pointing_game.a"] == pytest.approx(2 / 3)
    assert summary["annotated.pointing_game.b"] == pytest.approx(0.5)
    assert summary["annotated.energy_in_box.a"] == pytest.approx(2 / 3)
    assert summary["annotated.box_share"] == pytest.approx(0.25)
    assert summary["annotated.baseline_uniform.pointing_game"] == pytest.approx(0.25)
    assert summary["annotated.baseline_centre.pointing_game"] == pytest.approx(0.25)
    low, high = summary["annotated.pointing_game_ci_low"], summary["annotated.pointing_game_ci_high"]
    assert 0 <= low < 0.6 < high <= 1


def quadrant_model(size: int) -> keras.Model:
    """Looks only at the top-left quadrant: class 0 when it is bright, class 1 when it is dark."""
    inputs = keras.Input((size, size, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Cropping2D(((0, size // 2), (0, size // 2)))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2, activation="softmax")
    outputs = dense(x)
    dense.set_weights([np.array([[8.0, -8.0]]), np.array([-2.0, 2.0])])
    return keras.Model(inputs, outputs)


def test_deletion_and_insertion_see_where_the_evidence_is():
    size = 16
    model = quadrant_model(size)
    rng = np.random.default_rng(0)
    images = rng.integers(150, 255, (6, size, size, 1)).astype(np.uint8)
    assert (class_probabilities(model, images).argmax(axis=1) == 0).all()
    evidence, elsewhere = np.zeros((size, size)), np.zeros((size, size))
    evidence[: size // 2, : size // 2] = 1.0
    elsewhere[size // 2 :, size // 2 :] = 1.0
    classes = np.zeros(6, dtype=int)

    def predict(batch):
        return class_probabilities(model, batch)

    faithful = deletion_insertion(predict, images, np.stack([evidence] * 6), classes, steps=8)
    # Deleting the quadrant first drops the confidence faster than deleting random pixels ...
    assert faithful["deletion_auc"] < faithful["deletion_auc_random"] - 0.1
    # ... and revealing it first raises it faster.
    assert faithful["insertion_auc"] > faithful["insertion_auc_random"] + 0.1
    misleading = deletion_insertion(predict, images, np.stack([elsewhere] * 6), classes, steps=8)
    assert misleading["deletion_auc"] > misleading["deletion_auc_random"]
    assert misleading["insertion_auc"] < misleading["insertion_auc_random"]


def test_occluding_the_lesion_shows_whether_the_model_needs_it():
    size = 16
    model = quadrant_model(size)
    images = np.random.default_rng(1).integers(150, 255, (4, size, size, 1)).astype(np.uint8)
    needed, ignored = np.zeros((size, size), bool), np.zeros((size, size), bool)
    needed[:8, :8] = True  # the quadrant the model reads
    ignored[8:, 8:] = True  # another one
    masks = np.stack([needed, needed, ignored, ignored])
    labels = np.zeros(4, dtype=int)
    scores = lesion_occlusion(lambda batch: class_probabilities(model, batch), images, masks, labels, seed=0)
    assert (scores["occlusion_drop"][:2] > 0.9).all() and (scores["occlusion_drop"][2:].abs() < 1e-6).all()
    # The control moves each box clear of its lesion, so it never hides the lesion itself.
    assert (scores["occlusion_drop_elsewhere"][:2].abs() < 1e-6).all()
    summary = summarise_occlusion(scores, ["a", "a", "b", "b"], "annotated.")
    assert summary["annotated.occlusion_drop.b"] == pytest.approx(0.0, abs=1e-6)
    assert summary["annotated.occlusion_drop_ci_low.a"] <= summary["annotated.occlusion_drop.a"]
    assert summary["annotated.occluded_accuracy.b"] == 1.0 and summary["annotated.occluded_accuracy.a"] == 0.0


def write_beside_boxes(root, label_lines: dict[str, str]):
    """YOLO files next to the images of a folder-per-class dataset."""
    for name, text in label_lines.items():
        (root / name).with_suffix(".txt").write_text(text)


def test_yolo_files_beside_the_images_give_their_boxes(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=3, classes=["glioma", "pituitary"])
    write_beside_boxes(
        root,
        {
            "glioma/glioma_000.jpg": "2 0.3 0.3 0.2 0.2\n",
            "pituitary/pituitary_001.png": "0 0.5 0.5 0.1 0.1\n0 0.6 0.6 0.1 0.2\n",
            "pituitary/pituitary_002.jpg": "0 0.5 oops\n",
        },
    )
    found = scan(IngestParams(source=str(root)))
    boxes = dict(zip(found.images["path"].map(lambda p: p.split("/")[-1]), found.images["boxes"]))
    assert boxes["glioma_000.jpg"] == "2 0.3 0.3 0.2 0.2"
    assert boxes["pituitary_001.png"] == "0 0.5 0.5 0.1 0.1;0 0.6 0.6 0.1 0.2"
    assert boxes["glioma_001.png"] == ""
    assert found.images.set_index("path").loc["glioma/glioma_000.jpg", "label"] == "glioma"
    [reject] = found.rejects.to_dict("records")
    assert reject["path"].endswith("pituitary_002.jpg") and "malformed label file" in reject["reason"]


def test_annotated_set_keeps_boxed_images_in_the_models_class_order(tmp_path):
    root = make_dataset(tmp_path / "annotated", per_class=2, classes=["pituitary", "glioma"])
    write_beside_boxes(
        root, {"glioma/glioma_000.jpg": "2 0.3 0.3 0.2 0.2\n", "pituitary/pituitary_000.jpg": "0 0.5 0.5 0.1 0.1\n"}
    )
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    annotated = load_annotated_set(IngestParams(source="unused"), str(root), classes, 24, 1)
    assert annotated.images.shape == (2, 24, 24, 1)
    assert annotated.labels.tolist() == [0, 3] and annotated.unboxed == 2
    assert annotated.rows["path"].tolist() == ["glioma/glioma_000.jpg", "pituitary/pituitary_000.jpg"]
    # With ingest.hash_paths the folder's file names, which may name patients, are not shown either.
    hashed = load_annotated_set(IngestParams(source="unused", hash_paths=True), str(root), classes, 24, 1)
    assert not hashed.rows["path"].str.contains("glioma|pituitary").any() and hashed.rows["path"].str.len().min() > 8
    with pytest.raises(DataError, match=r"classes \['pituitary'\] .* not among the model's classes"):
        load_annotated_set(IngestParams(source="unused"), str(root), ["glioma", "notumor"], 24, 1)


def test_annotated_set_without_boxes_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "plain", per_class=2, classes=["glioma"])
    with pytest.raises(DataError, match="no image in .* has a YOLO box"):
        load_annotated_set(IngestParams(source="unused"), str(root), ["glioma", "notumor"], 24, 1)


def test_a_head_cropped_annotated_set_keeps_each_box_on_its_lesion(tmp_path):
    # A 200x120 slice: wide black margins, a grey head, a bright lesion inside it, a speck of burnt-in text.
    pixels = np.zeros((120, 200), dtype=np.uint8)
    pixels[20:100, 60:140] = 90  # head: x 60-140, y 20-100
    pixels[30:50, 110:130] = 250  # lesion: x 110-130, y 30-50
    pixels[2:4, 2:6] = 255  # text in a corner: too few pixels to count as head
    (tmp_path / "boxes" / "glioma").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "boxes" / "glioma" / "slice.png")
    box = f"0 {120 / 200} {40 / 120} {20 / 200} {20 / 120}\n"
    (tmp_path / "boxes" / "glioma" / "slice.txt").write_text(box)
    for crop, lesion_share in (("none", (20 * 20) / (200 * 200)), ("head", (20 * 20) / (80 * 80))):
        annotated = load_annotated_set(IngestParams(source="unused"), str(tmp_path / "boxes"), ["glioma"], 64, 1, crop)
        image, mask = annotated.images[0, ..., 0], annotated.masks[0]
        assert image[mask].mean() > 200 and mask[image > 240].all()  # the box sits on the lesion
        assert mask.mean() == pytest.approx(lesion_share, rel=0.25)
        assert np.array_equal(rectangles_mask(annotated.rectangles[0], 64), mask)  # what the grids draw
    assert (image > 50).mean() > 0.9  # the head fills the cropped input
