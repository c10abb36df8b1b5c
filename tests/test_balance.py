import numpy as np
import pandas as pd
import pytest

from brainmri.core.images import load_array
from brainmri.core.params import AugmentParams, IngestParams
from brainmri.core.shards import NO_BOX, ShardIndex, has_box, write_split
from brainmri.data.augment import _forward_matrix, augment, augment_with_box, moved_box
from brainmri.data.balance import balanced_training_records, plain_records
from brainmri.data.ingest import scan
from brainmri.data.split import stratified_split

from helpers import CLASSES, make_dataset


def uneven_split(root) -> pd.DataFrame:
    make_dataset(root, per_class=12)
    for surplus in (root / "glioma").glob("glioma_00[6-9]*"):
        surplus.unlink()
    images = scan(IngestParams(source=str(root), workers=1)).images
    return stratified_split(images, val=0.2, test=0.2, seed=0)


def test_augment_is_seeded_and_changes_the_image():
    image = np.zeros((32, 32, 1), np.uint8)
    image[8:16, 4:12] = 200
    params = AugmentParams(rotation=20, shift=0.1, zoom=0.1, flip=True, brightness=0.2, contrast=0.2)
    first = augment(image, np.random.default_rng(7), params)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, augment(image, np.random.default_rng(7), params))
    assert not np.array_equal(first, image)


def test_augment_with_everything_off_is_the_identity():
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    params = AugmentParams(rotation=0, shift=0, zoom=0, flip=False, brightness=0, contrast=0)
    assert np.array_equal(augment(image, np.random.default_rng(1), params), image)


def erased_share(original: np.ndarray, augmented: np.ndarray) -> float:
    """The share of the image that the one black box `augmented` adds to `original` covers."""
    rows, cols = np.nonzero((augmented == 0).any(axis=-1) & (original != 0).any(axis=-1))
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert len(rows) == height * width  # one solid rectangle
    return height * width / original.shape[0] / original.shape[1]


def test_erasing_blacks_out_one_box_of_two_to_a_third_of_the_image():
    image = np.full((64, 64, 1), 200, np.uint8)
    still = AugmentParams(rotation=0, shift=0, zoom=0, flip=False, brightness=0, contrast=0)
    rng = np.random.default_rng(3)
    shares = [erased_share(image, augment(image, rng, still.model_copy(update={"erasing": 1.0}))) for _ in range(50)]
    # Each side is sqrt(U(0.02, 0.33)) of the image's, rounded to whole pixels.
    assert 0.015 < min(shares) and max(shares) < 0.35 and np.std(shares) > 0.03
    half = [(augment(image, rng, still.model_copy(update={"erasing": 0.5})) == 0).any() for _ in range(200)]
    assert 0.4 < np.mean(half) < 0.6


def test_training_split_is_balanced_to_the_largest_class(tmp_path):
    split = uneven_split(tmp_path)
    train = split[split["split"] == "train"]
    before = train["label"].value_counts()
    assert before["glioma"] < before["notumor"]
    records = balanced_training_records(train, CLASSES, 24, 1, "max", 0, AugmentParams(), tmp_path)
    counts = pd.Series([CLASSES[r.label] for r in records]).value_counts()
    assert set(counts) == {before.max()}
    originals = [r for r in records if not r.augmented]
    assert len(originals) == len(train)  # every original kept once, unchanged
    assert sum(r.augmented for r in records) == before.max() * 4 - len(train)


def test_integer_target_below_a_class_size_undersamples(tmp_path):
    train = uneven_split(tmp_path).query("split == 'train'")
    records = balanced_training_records(train, CLASSES, 24, 1, 3, 0, AugmentParams(), tmp_path)
    assert len(records) == 12 and not any(r.augmented for r in records)


def test_shards_are_byte_identical_for_the_same_inputs(tmp_path):
    split = uneven_split(tmp_path / "images")
    train = split[split["split"] == "train"]
    outputs = []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        records = balanced_training_records(train, CLASSES, 24, 1, "max", 5, AugmentParams(), tmp_path / "images")
        names = write_split(records, folder, "train", shard_size=10)
        outputs.append([(folder / name).read_bytes() for name in names])
    assert len(outputs[0]) > 1 and outputs[0] == outputs[1]


def test_shard_index_round_trip(tmp_path):
    split = uneven_split(tmp_path / "images")
    test = split[split["split"] == "test"]
    records = plain_records(test, CLASSES, 24, 3, tmp_path / "images", crop="head")
    names = write_split(records, tmp_path, "test", shard_size=4)
    counts = {label: int((test["label"] == label).sum()) for label in CLASSES}
    ShardIndex(tmp_path, CLASSES, 24, 3, {"test": names}, {"test": counts}, crop="head").save()
    index = ShardIndex.load(tmp_path)
    assert index.crop == "head"
    first = test.sort_values(["label", "path"]).iloc[0]["path"]
    assert np.array_equal(records[0].image, load_array(tmp_path / "images" / first, 24, 3, "head"))
    images, labels, paths = index.arrays("test")
    assert images.shape == (len(test), 24, 24, 3) and images.dtype == np.uint8
    assert paths == [r.path for r in records]
    assert np.array_equal(images[0], records[0].image) and list(labels) == [r.label for r in records]


def bright_centroid(image: np.ndarray) -> tuple[float, float]:
    """(x, y) in pixel edges of the pixels brighter than the background."""
    rows, columns = np.nonzero(image[..., 0] > 100)
    return columns.mean() + 0.5, rows.mean() + 0.5


def test_a_box_moves_by_hand_checked_flips_rotations_zooms_and_shifts():
    box = (40.0, 10.0, 50.0, 20.0)  # on a 64-pixel image, PIL's centre at 31.5
    assert moved_box(box, _forward_matrix(64, 0, 1, 0, 0), 64, flipped=True) == (14.0, 10.0, 24.0, 20.0)
    # 90 degrees about the centre: (x, y) - c -> (-(y - c), x - c)
    assert moved_box(box, _forward_matrix(64, 90, 1, 0, 0), 64, False) == pytest.approx((43, 40, 53, 50))
    assert moved_box(box, _forward_matrix(64, 0, 1.5, 0, 0), 64, False) == pytest.approx((44.25, 0, 59.25, 14.25))
    assert moved_box(box, _forward_matrix(64, 0, 1, -5, 7), 64, False) == pytest.approx((35, 17, 45, 27))
    assert moved_box(box, _forward_matrix(64, 0, 1, 20, 0), 64, False) == NO_BOX  # more than half pushed out
    assert moved_box(NO_BOX, _forward_matrix(64, 30, 1, 0, 0), 64, True) == NO_BOX
    assert moved_box(box, _forward_matrix(64, 0, 1, 0, 0), 64, False, True) == (40.0, 44.0, 50.0, 54.0)  # upside down
    # Shear by 45 degrees: x moves by (y - 31.5), so the top edge by -21.5 and the bottom by -11.5.
    assert moved_box(box, _forward_matrix(64, 0, 1, 0, 0, 45), 64, False) == pytest.approx((18.5, 10, 38.5, 20))


def test_an_augmented_box_still_holds_its_moved_lesion():
    image = np.full((64, 64, 1), 20, np.uint8)
    image[18:26, 36:44] = 220  # the lesion
    params = AugmentParams(
        rotation=20, shift=0.1, zoom=0.2, flip=True, vertical_flip=True, shear=15, brightness=0, contrast=0
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        moved, (x0, y0, x1, y1) = augment_with_box(image, (36.0, 18.0, 44.0, 26.0), rng, params)
        x, y = bright_centroid(moved)
        assert x0 <= x <= x1 and y0 <= y <= y1


def test_boxes_go_from_the_manifest_through_balance_into_the_shards(tmp_path):
    split = uneven_split(tmp_path / "images")
    train = split[split["split"] == "train"].copy()
    boxed = train["label"] == "pituitary"
    train.loc[boxed, "boxes"] = "3 0.5 0.25 0.25 0.25"  # centred at (0.5, 0.25) of every pituitary image
    records = balanced_training_records(train, CLASSES, 24, 1, "max", 0, AugmentParams(), tmp_path / "images")
    pituitary = CLASSES.index("pituitary")
    for record in records:
        assert has_box(record.box) == (record.label == pituitary)
        if not record.augmented and record.label == pituitary:
            assert record.box == pytest.approx((9, 3, 15, 9))  # 48-pixel images shown at 24
    names = write_split(records, tmp_path, "train", shard_size=10)
    counts = {label: sum(r.label == i for r in records) for i, label in enumerate(CLASSES)}
    boxed_counts = {label: sum(r.label == i and has_box(r.box) for r in records) for i, label in enumerate(CLASSES)}
    ShardIndex(tmp_path, CLASSES, 24, 1, {"train": names}, {"train": counts}, boxed={"train": boxed_counts}).save()
    index = ShardIndex.load(tmp_path)
    assert index.boxed["train"]["pituitary"] == counts["pituitary"] and index.boxed["train"]["glioma"] == 0
    assert index.boxes("train") == pytest.approx(np.array([r.box for r in records], np.float32))


def test_a_head_cropped_record_keeps_its_box_on_the_lesion(tmp_path):
    # The box the shards store is the one gradcam scores the test split against: placed like the pixels.
    from PIL import Image

    pixels = np.zeros((120, 200), dtype=np.uint8)
    pixels[20:100, 60:140] = 90  # head: x 60-140, y 20-100, in wide black margins
    pixels[30:50, 110:130] = 250  # lesion: x 110-130, y 30-50
    (tmp_path / "glioma").mkdir()
    Image.fromarray(pixels).save(tmp_path / "glioma" / "slice.png")
    rows = pd.DataFrame(
        {"path": ["glioma/slice.png"], "label": ["glioma"], "boxes": [f"0 0.6 {40 / 120} 0.1 {20 / 120}"]}
    )
    for crop, expected in (("none", (35.2, 22.4, 41.6, 28.8)), ("head", (40, 8, 56, 24))):
        (record,) = plain_records(rows, ["glioma"], 64, 1, tmp_path, crop)
        assert record.box == pytest.approx(expected, abs=0.5)
        x0, y0, x1, y1 = (round(v) for v in record.box)
        assert record.image[y0:y1, x0:x1, 0].mean() > 200  # on the lesion
