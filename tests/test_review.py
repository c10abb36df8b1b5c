import keras
import numpy as np
import pytest
from PIL import Image

from brainmri.core.errors import ModelError
from brainmri.core.images import DecodeLimits, to_array
from brainmri.model.models import build_model, save_model
from brainmri.model.review import review_threshold, threshold_for_accuracy
from brainmri.serve.inference import Predictor

# Confidences, most confident first, and whether each prediction was right.
CONFIDENCE = np.array([0.99, 0.95, 0.90, 0.90, 0.80, 0.60, 0.55])
CORRECT = np.array([True, True, True, False, True, False, True])


def test_the_threshold_is_the_lowest_whose_accepted_images_reach_the_target():
    # Accepting down to 0.95: 2/2 right; to 0.90: 3/4; to 0.80: 4/5; to 0.60: 4/6; all: 5/7.
    assert threshold_for_accuracy(CONFIDENCE, CORRECT, 1.0) == (0.95, 2 / 7)
    assert threshold_for_accuracy(CONFIDENCE, CORRECT, 0.8) == (0.80, 5 / 7)
    assert threshold_for_accuracy(CONFIDENCE, CORRECT, 0.7) == (0.55, 1.0)


def test_tied_confidences_are_accepted_or_reviewed_together():
    # 0.90 right and 0.90 wrong: a threshold cannot take one without the other (3/4 < 1.0).
    threshold, coverage = threshold_for_accuracy(CONFIDENCE, CORRECT, 0.9)
    assert (threshold, coverage) == (0.95, 2 / 7)


def test_an_unreachable_target_sends_everything_to_review():
    threshold, coverage = threshold_for_accuracy(np.array([0.9, 0.8]), np.array([False, True]), 0.99)
    assert threshold > 0.9 and coverage == 0.0


def test_a_number_is_used_as_it_is_and_auto_needs_the_models_validation_confidences():
    assert review_threshold(0.7, 0.99, {}) == 0.7
    meta = {"validation_confidence": CONFIDENCE.tolist(), "validation_correct": list(CORRECT)}
    assert review_threshold("auto", 0.8, meta) == 0.80
    with pytest.raises(ModelError, match="review_threshold is auto, but this model carries no validation"):
        review_threshold("auto", 0.99, {"classes": ["a", "b"]})


def test_predict_and_serve_apply_the_threshold_and_the_crop_the_model_carries(tmp_path):
    model = build_model("compact_cnn", 2, 32, 1, width=4)
    meta = {
        "classes": ["a", "b"],
        "image_size": 32,
        "channels": 1,
        "crop": "head",
        "validation_confidence": CONFIDENCE.tolist(),
        "validation_correct": CORRECT.tolist(),
    }
    save_model(model, tmp_path / "models", meta)
    limits = DecodeLimits(max_pixels=10**6, max_side=4096, max_aspect=20.0, max_decoded_bytes=2**28)
    predictor = Predictor.load(tmp_path / "models", limits, "auto", 0.8)
    assert predictor.review_threshold == 0.80
    assert Predictor.load(tmp_path / "models", limits, 0.5).review_threshold == 0.5
    pixels = np.zeros((60, 90), dtype=np.uint8)
    pixels[10:50, 30:70] = 120  # a head in wide black margins
    slice_ = Image.fromarray(pixels)
    assert np.array_equal(predictor.array(slice_), to_array(slice_, 32, 1, "head"))
    assert (predictor.array(slice_) > 100).mean() > 0.9


def test_an_ensemble_averages_the_probabilities_of_its_members(tmp_path):
    meta = {"classes": ["a", "b"], "image_size": 32, "channels": 1}
    for name, seed in (("one", 1), ("two", 2)):
        keras.utils.set_random_seed(seed)
        save_model(build_model("compact_cnn", 2, 32, 1, width=4), tmp_path / name, meta)
    save_model(build_model("compact_cnn", 2, 32, 1, width=4), tmp_path / "other", {**meta, "classes": ["b", "a"]})
    limits = DecodeLimits(max_pixels=10**6, max_side=4096, max_aspect=20.0, max_decoded_bytes=2**28)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1), dtype=np.uint8)
    one, two = (
        np.array(
            [
                [row["probabilities"][c] for c in "ab"]
                for row in Predictor.load(tmp_path / n, limits).predict_arrays(images)
            ]
        )
        for n in ("one", "two")
    )
    assert np.abs(one - two).max() > 0.01  # two different members
    pair = Predictor.load_ensemble([tmp_path / "one", tmp_path / "two"], limits)
    assert len(pair.models) == 2 and " + " in pair.version
    averaged = np.array([[row["probabilities"][c] for c in "ab"] for row in pair.predict_arrays(images)])
    assert averaged == pytest.approx((one + two) / 2, abs=1e-5)
    with pytest.raises(ModelError, match="its classes .* differs from .*ensemble members must agree"):
        Predictor.load_ensemble([tmp_path / "one", tmp_path / "other"], limits)
    with pytest.raises(ModelError, match="auto is fitted to one model"):
        Predictor.load_ensemble([tmp_path / "one", tmp_path / "one"], limits, "auto")


class LeftHalfModel:
    """Class 1 in proportion to the brightness of the image's left half: a mirror image disagrees."""

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        left = images[:, :, : images.shape[2] // 2].reshape(len(images), -1).mean(axis=1) / 255
        return np.stack([1 - left, left], axis=1)


def test_flip_tta_averages_each_image_with_its_mirror_image_and_says_so():
    plain = Predictor([LeftHalfModel()], ["no", "yes"], 8, 1, "stand-in@1", DecodeLimits(10**6, 4096, 20, 2**28))
    image = np.zeros((1, 8, 8, 1), np.uint8)
    image[:, :, :4] = 255  # left half white: the plain model says yes, its mirror image no
    assert plain.predict_arrays(image)[0]["probabilities"] == {"no": 0.0, "yes": 1.0}
    flipped = plain.with_flip_tta()
    assert flipped.predict_arrays(image)[0]["probabilities"] == {"no": 0.5, "yes": 0.5}
    assert flipped.version == "stand-in@1 + flip TTA" and plain.version == "stand-in@1"


def test_predict_tta_in_params_turns_it_on_for_predict_and_serve(monkeypatch):
    from brainmri import cli
    from brainmri.core.params import Params

    stand_in = Predictor([LeftHalfModel()], ["no", "yes"], 8, 1, "stand-in@1", DecodeLimits(10**6, 4096, 20, 2**28))
    monkeypatch.setattr(Predictor, "load_ensemble", classmethod(lambda cls, *args, **kwargs: stand_in))
    params = Params.model_validate({"ingest": {"source": "data"}})
    assert not cli.load_predictor(None, params).flip_tta
    params = Params.model_validate({"ingest": {"source": "data"}, "predict": {"tta": True}})
    assert cli.load_predictor(None, params).flip_tta
