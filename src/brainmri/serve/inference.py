"""Using a trained model on new images: the `brainmri predict` command and the
web app share this code, and it decodes files exactly as the pipeline does
(`brainmri.core.images`), so a file gets the same prediction everywhere."""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from brainmri.core.errors import DataError, ModelError
from brainmri.core.images import (
    DecodeLimits,
    ImageTooLarge,
    keras_model_version,
    normalise_mode,
    open_image,
    sha256_file,
    to_array,
)
from brainmri.core.intended_use import NOT_A_MEDICAL_DEVICE
from brainmri.data.input_gate import gate_reasons
from brainmri.data.scanner import (
    NIFTI_SUFFIXES,
    ScannerFileError,
    ScannerOptions,
    is_dicom_bytes,
    is_scanner_file,
    read_dicom_bytes,
    read_scanner_file,
    slice_path,
    split_slice_path,
)
from brainmri.model.exported import OnnxClassifier, TfliteClassifier, find_export, is_export, load_export
from brainmri.model.review import review_threshold

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class BadImage(ValueError):
    """An upload that is not a readable image; the message says why in plain words, without the
    file's name (it can name a patient) or params.yaml keys."""


def pinned_model_uri(uri: str) -> tuple[str, str]:
    """`models:/<name>@<alias>` as the version the alias points to now, and how to name it
    (`models:/<name>/<version> (@<alias>)`): the model loaded is the one logged predictions name,
    even after the alias moves. Other URIs are returned as they are."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", uri)
    if match is None:
        return uri, uri
    from mlflow import MlflowClient

    name, alias = match.groups()
    version = MlflowClient().get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}", f"models:/{name}/{version} (@{alias})"


@dataclass
class Predictor:
    models: list[Any]  # keras.Model: one, or the members of an ensemble (their probabilities averaged)
    classes: list[str]
    image_size: int
    channels: int
    version: str  # what is serving: the model folder's content hash, or the MLflow URI
    limits: DecodeLimits  # what an image header may declare before it is decoded
    review_threshold: float = 0.8
    crop: str = "none"  # brainmri.core.images.content_box, as the model was trained
    scanner: ScannerOptions = ScannerOptions()  # how DICOM and NIfTI files become slices, as ingest reads them
    flip_tta: bool = False  # also classify each image's mirror image and average (predict.tta)
    input_gate: dict | None = None  # brainmri.data.input_gate's ranges, fitted by the train stage
    # The first model with its pooled features as a second output, when the gate measures them.
    gated_model: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.input_gate and "features" in self.input_gate and self.explainable:
            from brainmri.model.models import with_pooled_features

            self.gated_model = with_pooled_features(self.models[0])

    @classmethod
    def load_ensemble(
        cls,
        sources: list[str | Path],
        limits: DecodeLimits,
        review: float | str = 0.8,
        target_accuracy: float = 0.99,
        scanner: ScannerOptions | None = None,
    ) -> Predictor:
        """One model, or several whose (calibrated) probabilities are averaged: a seed ensemble.

        Members must agree on classes and input (size, channels, crop). An automatic review
        threshold is fitted to one model's own validation confidences, so an ensemble needs a number."""
        scanner = scanner or ScannerOptions()
        if len(sources) == 1:
            return replace(cls.load(sources[0], limits, review, target_accuracy), scanner=scanner)
        if review == "auto":
            raise ModelError(
                "evaluate.review_threshold: auto is fitted to one model's validation confidences; "
                "for an ensemble of several --model set a number"
            )
        members = [cls.load(source, limits, review) for source in sources]
        first = members[0]
        for source, member in zip(sources[1:], members[1:]):
            if difference := member.input_difference(first.input_spec()):
                field, theirs, ours = difference
                raise ModelError(
                    f"--model {source}: its {field} {theirs!r} differs from "
                    f"{sources[0]}'s {ours!r}; ensemble members must agree"
                )
        models = [model for member in members for model in member.models]
        version = " + ".join(member.version for member in members)
        return cls(
            models,
            first.classes,
            first.image_size,
            first.channels,
            version,
            limits,
            first.review_threshold,
            first.crop,
            scanner,
            input_gate=first.input_gate,
        )

    @classmethod
    def load(
        cls, source: str | Path, limits: DecodeLimits, review: float | str = 0.8, target_accuracy: float = 0.99
    ) -> Predictor:
        """From a model folder (`models/`) or an MLflow model URI (`runs:/<id>/model`, `models:/<name>/<version>`).

        `review` is evaluate.review_threshold: a number, or auto (fitted to `target_accuracy` on the
        validation confidences the model carries)."""
        source = str(source)
        if "://" in source or source.startswith(("runs:/", "models:/")):
            return cls._from_mlflow(source, limits, review, target_accuracy)
        if is_export(source):
            return cls._from_export(source, limits, review, target_accuracy)
        from brainmri.model.models import load_model

        model, meta = load_model(source)
        return cls._from_meta(model, meta, keras_model_version(source, meta), limits, review, target_accuracy)

    @classmethod
    def _from_export(cls, source: str, limits: DecodeLimits, review: float | str, target_accuracy: float) -> Predictor:
        """From an ONNX or TFLite file of the export stage, or the exports folder (its preferred file)."""
        export = find_export(source)
        digest = sha256_file(export.path)[:12]
        version = f"{export.report.get('model', 'model')}-{export.variant}@sha256:{digest}"
        return cls._from_meta(load_export(export), export.report, version, limits, review, target_accuracy)

    @classmethod
    def _from_meta(
        cls, model: Any, meta: dict, version: str, limits: DecodeLimits, review: float | str, target_accuracy: float
    ) -> Predictor:
        """One model and the metadata it travels with (model.json, or export.json for an export)."""
        return cls(
            [model],
            meta["classes"],
            meta["image_size"],
            meta["channels"],
            version,
            limits,
            review_threshold(review, target_accuracy, meta),
            meta.get("crop", "none"),
            input_gate=meta.get("input_gate"),
        )

    @property
    def explainable(self) -> bool:
        """Grad-CAM needs gradients: Keras models have them, exported ones do not."""
        return not any(isinstance(model, (OnnxClassifier, TfliteClassifier)) for model in self.models)

    @classmethod
    def _from_mlflow(cls, uri: str, limits: DecodeLimits, review: float | str, target_accuracy: float) -> Predictor:
        import mlflow
        import mlflow.keras

        from brainmri.core.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            uri, version = pinned_model_uri(uri)
            model = mlflow.keras.load_model(uri)
            # The train stage logs the class names beside the model, in the same run.
            run_id = mlflow.models.get_model_info(uri).run_id
            meta_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model_meta/model.json")
        except Exception as error:  # MLflow raises several types for an unknown run, model or version
            raise ModelError(f"--model {uri}: cannot load it from MLflow at {tracking_uri()}: {error}") from None
        meta = json.loads(Path(meta_path).read_text())
        return cls._from_meta(model, meta, version, limits, review, target_accuracy)

    def input_spec(self) -> dict[str, Any]:
        """What ensemble members must share: the classes and how an image becomes the model's input."""
        return {"classes": self.classes, "image_size": self.image_size, "channels": self.channels, "crop": self.crop}

    def input_difference(self, spec: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """The first (field, this model's value, `spec`'s value) that differs from `spec`, or None."""
        for key, value in self.input_spec().items():
            if value != spec[key]:
                return key, value, spec[key]
        return None

    def array(self, image: Image.Image) -> np.ndarray:
        return to_array(normalise_mode(image), self.image_size, self.channels, self.crop)

    def with_flip_tta(self) -> Predictor:
        """This predictor with flip test-time augmentation; its version says so (audit trail, answers)."""
        return replace(self, flip_tta=True, version=f"{self.version} + flip TTA")

    def probabilities_and_features(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The (ensemble's) probabilities, and the first model's pooled features when the input gate
        measures them (one model call for both), else None."""
        from brainmri.model.models import class_probabilities, ensemble_probabilities, model_outputs, probabilities_of

        if self.gated_model is None:
            return ensemble_probabilities(self.models, arrays), None
        features, raw = model_outputs(self.gated_model, arrays)
        members = [probabilities_of(raw), *(class_probabilities(model, arrays) for model in self.models[1:])]
        return np.mean(members, axis=0), np.asarray(features)

    def predict_arrays(self, arrays: np.ndarray) -> list[dict[str, Any]]:
        if self.flip_tta:  # one call for both: the mirror images (width axis) after the originals
            both, features = self.probabilities_and_features(np.concatenate([arrays, arrays[:, :, ::-1, :]]))
            probabilities = (both[: len(arrays)] + both[len(arrays) :]) / 2
            features = None if features is None else features[: len(arrays)]
        else:
            probabilities, features = self.probabilities_and_features(arrays)
        results = []
        for row, reason in zip(probabilities, gate_reasons(self.input_gate, arrays, features)):
            best = int(row.argmax())
            results.append(
                {
                    "predicted_class": self.classes[best],
                    "confidence": round(float(row[best]), 6),
                    "probabilities": {name: round(float(p), 6) for name, p in zip(self.classes, row)},
                    "needs_review": bool(row[best] < self.review_threshold or reason),
                    **({"review_reason": reason} if reason else {}),
                    "notice": NOT_A_MEDICAL_DEVICE,
                }
            )
        return results

    def decode_upload(self, data: bytes, name: str, max_slices: int) -> list[tuple[int | None, Image.Image]]:
        """(slice index, image) for every frame of an uploaded DICOM file or slice of a NIfTI volume
        (named `.nii` / `.nii.gz`), read as ingest reads them, with the same limits; (None, image)
        for a plain image. BadImage says what is wrong, also for more than `max_slices` slices."""
        if is_dicom_bytes(data):
            try:
                slices = read_dicom_bytes(data, self.scanner, self.limits)
            except ScannerFileError as error:
                raise BadImage(error.plain) from None
        elif name.lower().endswith(NIFTI_SUFFIXES):
            slices = read_nifti_bytes(data, name, self.scanner, self.limits)
        else:
            return [(None, decode_bytes(data, self.limits))]
        if len(slices) > max_slices:
            raise BadImage(
                f"{len(slices)} slices, more than the {max_slices} one upload may hold; "
                "brainmri predict reads a whole volume"
            )
        return [(found.index, found.image) for found in slices]

    def model_inputs(self, path: Path) -> list[tuple[str, np.ndarray]]:
        """(name, model input) for an image file, or for every slice of a DICOM file or NIfTI volume."""
        if is_scanner_file(path):
            slices = read_scanner_file(path, self.scanner, self.limits, b"")
            return [(slice_path(str(path), found.index), self.array(found.image)) for found in slices]
        return [(str(path), self.array(open_image(path, self.limits)))]

    def predict_files(self, paths: Iterable[Path], batch_size: int = 64) -> Iterator[dict[str, Any]]:
        """One result per image file or scanner slice (`<file>#<index>`, with its `slice`), in order;
        unreadable files give an `error` instead of stopping the run."""
        for result, _ in self.predict_files_with_inputs(paths, batch_size):
            yield result

    def predict_files_with_inputs(
        self, paths: Iterable[Path], batch_size: int = 64
    ) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """`predict_files`' results, each with the model input it was computed from (None for an
        error): what a Grad-CAM of the same image needs, without reading a scanner file again."""
        batch: list[tuple[str, np.ndarray]] = []
        for path in paths:
            try:
                inputs = self.model_inputs(path)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
                yield from self._flush(batch)
                batch = []
                error_result = {"path": str(path), "error": f"not a readable image: {error}"}
                yield {**error_result, "notice": NOT_A_MEDICAL_DEVICE}, None
                continue
            for item in inputs:
                batch.append(item)
                if len(batch) == batch_size:
                    yield from self._flush(batch)
                    batch = []
        yield from self._flush(batch)

    def _flush(self, batch: list[tuple[str, np.ndarray]]) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        if batch:
            arrays = np.stack([array for _, array in batch])
            for (name, array), result in zip(batch, self.predict_arrays(arrays)):
                index = split_slice_path(name)[1]
                yield {"path": name, **({"slice": index} if index is not None else {}), **result}, array

    def gradcam_png(self, array: np.ndarray, class_index: int, alpha: float = 0.4) -> bytes:
        """The Grad-CAM overlay of one (size, size, channels) image for one class, as PNG bytes."""
        if not self.explainable:
            raise ModelError(f"{self.version} is an exported model: Grad-CAM needs the Keras model (--model models)")
        from brainmri.explain.gradcam import gradcam_heatmaps, last_feature_map_layer, overlay, upsample

        # An ensemble's explanation: the mean of its members' heatmaps, each scaled to its peak.
        heatmap = np.mean(
            [
                upsample(
                    gradcam_heatmaps(model, array[None], np.array([class_index]), last_feature_map_layer(model))[0][0],
                    self.image_size,
                )
                for model in self.models
            ],
            axis=0,
        )
        return png_bytes((overlay(array, heatmap, alpha) * 255).round().astype(np.uint8))


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 (height, width[, 1 or 3]) picture, such as a model input or an overlay, as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(picture[..., 0] if picture.ndim == 3 and picture.shape[-1] == 1 else picture).save(buffer, "PNG")
    return buffer.getvalue()


def decode_bytes(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Fully decode uploaded bytes (after checking the header against `limits`); BadImage says what is wrong."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # no file to close: the decoded image is kept, not copied
        limits.check(*image.size)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except UnidentifiedImageError:
        raise BadImage("not an image file") from None
    except ImageTooLarge as error:
        raise BadImage(error.plain) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadImage(f"corrupt or truncated image ({error})") from None


def read_nifti_bytes(data: bytes, name: str, options: ScannerOptions, limits: DecodeLimits) -> list:
    """An uploaded NIfTI volume's slices, through a private temporary file (nibabel reads files),
    with ingest's checks: the declared size against the limits before any voxel is inflated."""
    suffix = ".nii.gz" if name.lower().endswith(".gz") else ".nii"
    with tempfile.TemporaryDirectory(prefix="brainmri-upload-") as scratch:
        path = Path(scratch) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return read_scanner_file(path, options, limits, b"", "upload")
        except ScannerFileError as error:
            raise BadImage(error.plain) from None


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image and scanner files (DICOM, NIfTI) under each folder (sorted, recursive)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or is_scanner_file(p))
                )
            )
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"brainmri predict: no such file or folder '{item}'")
    return found
