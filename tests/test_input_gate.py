"""The input gate (brainmri.input_gate): fitted on training slices, it passes slices like them
and sends blank, noise and other non-MRI inputs to review with a reason."""

from __future__ import annotations

import numpy as np

from brainmri.images import DecodeLimits
from brainmri.inference import Predictor
from brainmri.input_gate import fit_gate, gate_reasons

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
