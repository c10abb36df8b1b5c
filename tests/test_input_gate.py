"""The input gate (brainmri.data.input_gate): fitted on training slices, it passes slices like them
and sends blank, noise and other non-MRI inputs to review with a reason."""

from __future__ import annotations

import numpy as np

from brainmri.core.images import DecodeLimits
from brainmri.data.input_gate import feature_distances, fit_feature_gate, fit_gate, gate_reasons
from brainmri.serve.inference import Predictor

from helpers import MeanBrightnessModel

SIZE = 32


def head(rng: np.random.Generator) -> np.ndarray:
    """A slice-like image: a bright ellipse (the head) with smooth structure on a black background."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    radius = rng.uniform(0.3, 0.45)
    inside = (xx / radius) ** 2 + (yy / (radius * rng.uniform(0.8, 1.1))) ** 2 < 1
    tissue = rng.uniform(80, 160) + 40 * np.sin(6 * xx + rng.uniform(0, 3)) * np.cos(5 * yy)
    pixels = np.where(inside, tissue, 0) + rng.normal(0, 3, (SIZE, SIZE))
    return np.clip(pixels, 0, 255).astype(np.uint8)[..., None]


def slices(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([head(rng) for _ in range(count)])


def not_mri() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(9)
    checks = (np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return {
        "black": np.zeros((SIZE, SIZE, 1), np.uint8),
        "white": np.full((SIZE, SIZE, 1), 255, np.uint8),
        "noise": rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8),
        "checkerboard": checks[..., None],
        "bright page": np.clip(rng.normal(235, 8, (SIZE, SIZE, 1)), 0, 255).astype(np.uint8),
    }


def test_training_like_slices_pass_and_non_mri_inputs_are_sent_to_review_with_a_reason():
    gate = fit_gate(slices(400, 0))
    unseen = gate_reasons(gate, slices(200, 1))
    assert sum(reason is not None for reason in unseen) <= 2  # at most 1% of unseen slices
    hostile = not_mri()
    reasons = dict(zip(hostile, gate_reasons(gate, np.stack(list(hostile.values())))))
    assert reasons["black"].startswith("blank") and reasons["white"].startswith("blank")
    for name in ("noise", "checkerboard", "bright page"):
        assert reasons[name].startswith("unlike the training slices: "), name
    assert "roughness" in reasons["noise"] and "foreground" in reasons["bright page"]


def test_a_gated_input_needs_review_whatever_its_confidence_and_says_why():
    gate = fit_gate(slices(200, 0))
    predictor = Predictor(
        [MeanBrightnessModel()], ["dark", "bright"], SIZE, 1, "stand-in@1", DecodeLimits(10**6, 4096, 20, 2**28),
        review_threshold=0.5, input_gate=gate,
    )  # fmt: skip
    white, slice_ = not_mri()["white"], slices(1, 5)[0]
    flagged, passed = predictor.predict_arrays(np.stack([white, slice_]))
    assert flagged["confidence"] == 1.0 and flagged["needs_review"] and flagged["review_reason"].startswith("blank")
    assert "review_reason" not in passed
    ungated = Predictor([MeanBrightnessModel()], ["dark", "bright"], SIZE, 1, "stand-in@1",
                        DecodeLimits(10**6, 4096, 20, 2**28), review_threshold=0.5)  # fmt: skip
    assert not ungated.predict_arrays(white[None])[0]["needs_review"]  # without a gate: confident nonsense


def test_the_feature_gate_keeps_the_training_cloud_and_flags_what_lies_far_from_every_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    features = rng.normal(0, 1, (400, 8)) + 6 * np.eye(8)[labels]  # four clusters
    gate = fit_feature_gate(features, labels)
    assert (feature_distances(gate, features) <= gate["threshold"]).mean() >= 0.99
    unseen = rng.normal(0, 1, (200, 8)) + 6 * np.eye(8)[rng.integers(0, 4, 200)]
    assert (feature_distances(gate, unseen) > gate["threshold"]).mean() <= 0.02
    far = np.full((3, 8), 12.0)  # like no class
    images = slices(3, 2)  # the statistics pass: only the features give these away
    reasons = gate_reasons({**fit_gate(slices(200, 0)), "features": gate}, images, far)
    assert all(reason and "feature distance" in reason for reason in reasons)
    assert gate_reasons({**fit_gate(slices(200, 0)), "features": gate}, images, features[:3]) == [None] * 3


def test_with_a_feature_gate_one_model_call_gives_the_same_probabilities_and_the_features():
    from brainmri.model.models import build_model, model_outputs, with_pooled_features

    model = build_model("compact_cnn", 4, SIZE, 1, width=4)
    images = slices(16, 3)
    features, _ = model_outputs(with_pooled_features(model), images)
    gate = {**fit_gate(images), "features": fit_feature_gate(np.asarray(features), np.arange(16) % 4)}
    limits = DecodeLimits(10**6, 4096, 20, 2**28)
    plain = Predictor([model], ["a", "b", "c", "d"], SIZE, 1, "m@1", limits)
    gated = Predictor([model], ["a", "b", "c", "d"], SIZE, 1, "m@1", limits, input_gate=gate)
    probabilities, measured = gated.probabilities_and_features(images)
    np.testing.assert_allclose(probabilities, plain.probabilities_and_features(images)[0], atol=1e-6)
    np.testing.assert_allclose(measured, features, atol=1e-5)
    assert plain.probabilities_and_features(images)[1] is None
