"""The schema of ``params.yaml``, validated as a whole before any stage does work.

Every stage loads the full file so that a typo anywhere (an unknown key, a wrong
type) stops the pipeline at its first stage with the key named, instead of
surfacing later as a silent default or a traceback deep inside TensorFlow.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from brainmri.core.errors import ParamsError


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt `train.lrr` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingParams(_Section):
    experiment: str = "brain-mri"
    registered_model: str = Field(
        "brain-mri-classifier", min_length=1, description="MLflow registry name of the trained model"
    )
    required: bool = Field(True, description="false: run on, with a warning, when MLflow cannot be reached")


class OutlierParams(_Section):
    min_side: int = Field(64, ge=1, description="flag images whose short side is smaller (px)")
    max_aspect: float = Field(2.0, ge=1, description="flag images more elongated than this")
    brightness_z: float = Field(5.0, gt=0, description="flag mean brightness this many robust SDs off")
    contrast_z: float = Field(5.0, gt=0, description="flag contrast this many robust SDs off")


def _percentile_pair(value: list[float]) -> list[float]:
    if len(value) != 2 or not 0 <= value[0] < value[1] <= 100:
        raise ValueError("must be [low, high] with 0 <= low < high <= 100")
    return value


class DicomParams(_Section):
    window: Literal["auto", "file", "percentile"] = Field(
        "auto", description="auto: the file's Window Center/Width when present, else percentiles of the slice"
    )
    percentiles: list[float] = Field([0.5, 99.5], description="the percentile window's limits")
    modalities: list[str] = Field(["MR"], min_length=1, description="DICOM Modality values read; others rejected")

    @field_validator("percentiles")
    @classmethod
    def _pair(cls, value: list[float]) -> list[float]:
        return _percentile_pair(value)


class NiftiParams(_Section):
    axis: Literal[0, 1, 2] = Field(
        2, description="slice along, after reorienting to RAS+: 0 sagittal, 1 coronal, 2 axial"
    )
    volume: int = Field(0, ge=0, description="the volume of a 4D file")
    slices: Literal["all", "middle", "foreground"] = Field(
        "all", description="every slice, the middle ones, or those with enough tissue"
    )
    middle: int = Field(20, ge=1, description="slices: middle keeps this many around the centre")
    min_foreground: float = Field(0.1, ge=0, le=1, description="slices: foreground keeps slices with this tissue share")
    percentiles: list[float] = Field([0.5, 99.5], description="each volume's window, from its non-background voxels")

    @field_validator("percentiles")
    @classmethod
    def _pair(cls, value: list[float]) -> list[float]:
        return _percentile_pair(value)


class IngestParams(_Section):
    source: str
    classes: list[str] | None = Field(None, description="class folders to use, or YOLO class-id names")
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"]
    min_per_class: int = Field(2, ge=1)
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are rejected undecoded")
    max_side: int = Field(16_384, ge=1, description="images with a longer side are rejected undecoded")
    max_aspect: float = Field(20.0, ge=1, description="images more elongated than this are rejected undecoded")
    # A 512x512x1024 16-bit volume fits; a scanner file that inflates to gigabytes of pixels does not.
    max_decoded_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="scanner files whose header declares more pixel bytes are rejected"
    )
    workers: int = Field(0, ge=0, description="decoding processes; 0: one per CPU core")
    outliers: OutlierParams = OutlierParams()
    labels_csv: str | None = Field(
        None, description="a table in ingest.source: label per path, patient, study or series, not per folder"
    )
    hash_paths: bool = Field(
        False, description="record salted hashes of the paths (which may name patients), not the paths"
    )
    dicom: DicomParams = DicomParams()
    nifti: NiftiParams = NiftiParams()

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("must name at least 2 distinct classes")
        return value


class DedupParams(_Section):
    near: bool = True
    hash_distance: int = Field(6, ge=0, le=31, description="max pHash bits apart for a candidate pair")
    min_correlation: float = Field(0.99, gt=0, le=1, description="thumbnail correlation that confirms a pair")
    workers: int = Field(0, ge=0, description="thumbnail processes; 0: one per CPU core")


class SplitParams(_Section):
    seed: int = 42
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    test_subset: str | None = Field(None, description="use this ingested subset (e.g. Testing) as the test split")
    group_by: Literal["auto", "duplicate", "patient", "study", "series"] = Field(
        "auto", description="what never straddles splits besides duplicates; auto: patient when the data has keys"
    )
    group_pattern: str | None = Field(
        None, description="a regex on the image path whose first group is the patient (image files)"
    )

    @field_validator("group_pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                groups = re.compile(value).groups
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
            if groups < 1:
                raise ValueError("needs a group, e.g. '^(P\\d+)_': its first group is the patient")
        return value


# train.lr is the rate at this global batch; train.lr_scaling carries it to others.
REFERENCE_BATCH = 32

# Random erasing's box (Zhong et al. 2020): between these shares of the image's area.
ERASED_AREA = (0.02, 0.33)


class AugmentParams(_Section):
    rotation: float = Field(10.0, ge=0, le=180, description="max degrees either way")
    shift: float = Field(0.05, ge=0, lt=0.5, description="max fraction of the side")
    zoom: float = Field(0.1, ge=0, lt=0.5, description="max relative scale change")
    flip: bool = True
    vertical_flip: bool = Field(False, description="also mirror top-bottom, half of the time")
    shear: float = Field(0.0, ge=0, lt=45, description="max shear angle in degrees, either way (along x)")
    brightness: float = Field(0.1, ge=0, lt=1, description="max relative change")
    contrast: float = Field(0.1, ge=0, lt=1, description="max relative change")
    erasing: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"probability that one random box ({ERASED_AREA[0]:.0%}-{ERASED_AREA[1]:.0%} of the image)"
        " is set to black",
    )


class BalanceParams(_Section):
    seed: int = 42
    target: int | Literal["max"] = "max"
    shard_size: int = Field(2048, ge=1)
    augment: AugmentParams = AugmentParams()

    @field_validator("target")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'max'")
        return value


class FineTuneParams(_Section):
    epochs: int = Field(0, ge=0, description="second phase with the top of the backbone unfrozen; 0: none")
    layers: int = Field(20, ge=1, description="backbone layers unfrozen from the top (batch norm stays frozen)")
    lr: float = Field(1e-5, gt=0)


class LocalisationParams(_Section):
    loss: Literal["auto", "none", "energy", "rrr"] = Field(
        "auto",
        description="energy: training images with a tumour box add 1 - the share of their class's positive "
        "activation map inside the box (Rao et al. 2023) to the loss; rrr: the mean squared activation map "
        "(either sign) outside the box (Right for the Right Reasons, Ross et al. 2017, on the map); auto: "
        "energy when some training image carries a box, none (labels only) otherwise",
    )
    weight: float = Field(1.0, ge=0, description="the box term's weight beside the classification loss")
    boxes: str | None = Field(
        None,
        description="a folder of box-annotated images (YOLO, as ingest reads them) whose boxes are attached to "
        "the training split's own copies of those images; copies of validation or test images get none",
    )
    add_unmatched: bool = Field(
        False,
        description="the boxes folder's image files without a copy anywhere in the data join the training "
        "split as images of their own, with their boxes",
    )

    @property
    def term(self) -> str:
        """The box term that trains when boxes supervise: `auto` means energy."""
        return "energy" if self.loss == "auto" else self.loss


# The compact CNN and the keras.applications backbones that brainmri.model.models builds.
MODEL_NAMES = (
    "compact_cnn",
    "resnet50",
    "resnet101",
    "inception_v3",
    "efficientnet_b0",
    "efficientnetv2_b0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "densenet121",
    "efficientnet_lite0",
)


class TrainParams(_Section):
    model: str = "compact_cnn"
    weights: str | None = Field(None, description="none, imagenet, or a weights file for the backbone")
    epochs: int = Field(45, ge=1)
    lr: float = Field(2e-3, gt=0, description=f"the peak rate at a global batch of {REFERENCE_BATCH} images")
    lr_scaling: Literal["sqrt", "linear", "none"] = Field(
        "sqrt",
        description=f"the rate at other global batches: times sqrt(batch / {REFERENCE_BATCH}) (Adam's rule), "
        f"times batch / {REFERENCE_BATCH} (SGD's), or unchanged",
    )
    lr_schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = Field(1, ge=0, description="cosine: linear warm-up epochs")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's decoupled L2 penalty")
    batch_size: int = Field(32, ge=1, description="per device; the global batch is this times the replicas")
    image_size: int = Field(128, ge=16)
    channels: Literal[1, 3] = 1
    crop: Literal["none", "head"] = Field(
        "none", description="head: each slice cropped to the head's bounding square before resizing"
    )
    seed: int = 42
    width: int = Field(16, ge=4, description="filters of the first compact_cnn block")
    norm: Literal["batch", "group"] = Field(
        "batch", description="compact_cnn normalisation: batch (re-estimated after training) or group"
    )
    pooling: Literal["avg", "max"] = Field(
        "avg",
        description="global pooling of the last feature map: avg sums evidence over the slice, max takes "
        "each feature where it is strongest",
    )
    last_block_kernel: Literal[1, 3] = Field(
        3, description="compact_cnn: 1 makes each final feature describe a local patch, not most of the slice"
    )
    last_block_dilation: Literal[1, 2] = Field(
        1,
        description="compact_cnn: 2 drops block 3's pooling and dilates block 4's kernels, so the last feature "
        "map (Grad-CAM's) is twice as fine over the same field of view; slower, and no better at pointing "
        "(benchmarks/README.md, 'Where Grad-CAM points with labels alone')",
    )
    dropout: float = Field(0.3, ge=0, lt=1)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    class_weight: Literal["none", "balanced"] = "none"
    augment: AugmentParams = Field(
        AugmentParams(rotation=10.0, shift=0.1, zoom=0.2, brightness=0.0, contrast=0.0),
        description="random transforms in the training step only; the balance stage already transforms its copies",
    )
    cutmix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="CutMix on each training batch (keras.layers.CutMix's factor); 0: off",
    )
    early_stopping_patience: int = Field(15, ge=1)
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="a validation loss must fall by more than this to count as an improvement"
    )
    calibrate: bool = Field(True, description="temperature scaling fitted on the validation split")
    tensorboard: bool = Field(False, description="also write TensorBoard event files under logs/tensorboard/")
    reduce_lr_patience: int = Field(3, ge=1)
    fine_tune: FineTuneParams = FineTuneParams()
    localisation: LocalisationParams = LocalisationParams()
    backend: Literal["auto", "tensorflow", "jax"] = Field(
        "auto", description="Keras backend of the train and evaluate stages; auto: $KERAS_BACKEND, else TensorFlow"
    )
    device: Literal["auto", "cpu", "gpu"] = "auto"
    mixed_precision: bool | Literal["auto"] = Field(
        "auto",
        description="auto: on GPU bfloat16 (float16 before compute capability 8.0); on CPU bfloat16 under "
        "TensorFlow where the CPU has it natively; else float32",
    )
    xla: bool | Literal["auto"] = Field("auto", description="XLA compilation; auto: Keras decides per model")
    strategy: Literal["auto", "single", "mirrored", "multi_worker"] = Field(
        "auto",
        description="multi_worker: one process per machine (TensorFlow: the cluster in TF_CONFIG; "
        "JAX: keras.distribution.initialize's KERAS_DISTRIBUTION_* variables)",
    )
    deterministic: bool | Literal["portable"] = Field(
        "portable",
        description="true: TensorFlow op determinism, the same weights on each run; portable: also float64, "
        "so the same metrics on any x86-64 CPU (about 3x slower); false: fastest",
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        # `dvc exp run -S train.weights=none` writes the string "none".
        return None if isinstance(value, str) and value.lower() in {"none", "null", ""} else value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model '{value}'; choose one of {', '.join(MODEL_NAMES)}")
        return value

    @model_validator(mode="after")
    def _portable_runs_in_float64(self) -> TrainParams:
        if self.deterministic == "portable" and self.mixed_precision is True:
            raise ValueError(
                "train.deterministic: portable trains in float64; set train.mixed_precision to auto or false, "
                "or train.deterministic to true or false"
            )
        return self

    @model_validator(mode="after")
    def _fine_tune_needs_a_pretrained_backbone(self) -> TrainParams:
        if self.fine_tune.epochs and (self.model == "compact_cnn" or self.weights is None):
            raise ValueError(
                "train.fine_tune.epochs needs a keras.applications train.model with pretrained train.weights"
            )
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(64, ge=1)
    review_threshold: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        0.8, description="below this top-1 confidence: human review; auto: fitted to target_accuracy"
    )
    target_accuracy: float = Field(
        0.99, gt=0, le=1, description="auto review threshold: the accuracy its accepted validation images reach"
    )
    quality_floor: float = Field(
        0.9, ge=0, le=1, description="test macro-F1 below which the model card says the model is not fit for use"
    )
    calibration_bins: int = Field(15, ge=2, le=100)
    tta: bool = Field(True, description="also report horizontal-flip test-time augmentation")
    external: str | None = Field(None, description="an extra labelled test folder, checked and scored too")
    ensemble: list[str] = Field(
        [], description="other model folders or MLflow model URIs, averaged with this model as ensemble.* keys"
    )
    seed: int = Field(0, description="bootstrap resampling of the test images for the intervals")


class GradcamParams(_Section):
    num_images: int = Field(8, ge=1, description="test images drawn, taken from each class in turn")
    layer: str | None = None
    method: Literal["gradcam", "gradcam++", "hirescam", "layercam"] = "gradcam"
    alpha: float = Field(0.4, ge=0, le=1, description="heatmap opacity in overlays")
    annotated: str | None = Field(
        None,
        description="a folder of box-annotated images whose boxes the heatmaps are scored against (evaluation only)",
    )
    faithfulness_images: int = Field(200, ge=0, description="test images for the deletion/insertion check; 0: off")
    faithfulness_steps: int = Field(16, ge=2, description="points on each deletion/insertion curve")
    seed: int = Field(0, description="bootstrap resampling and the random pixel order")


class ExportParams(_Section):
    formats: list[Literal["float32", "float16", "int8", "onnx", "onnx_int8"]] = Field(
        ["float32", "float16", "int8", "onnx", "onnx_int8"],
        min_length=1,
        description="TFLite variants, ONNX, and ONNX with int8 convolutions",
    )
    calibration_images: int = Field(128, ge=1, description="int8: representative images, also the parity check set")


class PredictParams(_Section):
    tta: bool = Field(
        False,
        description="brainmri predict and serve: average each image's probabilities with its mirror image's "
        "(flip test-time augmentation; the review threshold stays the one fitted without it)",
    )


class ServeParams(_Section):
    max_upload_mb: float = Field(10.0, gt=0, description="larger uploads get 413")
    threads: int = Field(16, ge=1, description="request threads of the WSGI server")
    max_batch: int = Field(16, ge=1, description="concurrent requests answered by one model call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits for others to join its batch")
    max_decodes: int = Field(4, ge=1, description="uploads decoded at once; the others wait their turn")
    max_slices: int = Field(64, ge=1, description="slices of one uploaded DICOM or NIfTI file; a larger file gets 400")
    timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 503")
    allowed_hosts: list[str] = Field(
        [], description="Host names the server answers besides its bind address and loopback names (DNS rebinding)"
    )
    allowed_origins: list[str] = Field(
        [], description="web pages (scheme://host[:port]) other than the server's own that may POST to it"
    )
    idle_timeout_s: float = Field(10.0, gt=0, description="a connection silent this long is closed (slow clients)")
    connection_limit: int = Field(256, ge=1, description="open connections the server accepts at once")


class AuditParams(_Section):
    file: str | None = Field("logs/predictions.jsonl", description="JSON lines of every prediction; null: off")
    max_mb: float = Field(10.0, gt=0, description="the file rotates at this size")
    backups: int = Field(5, ge=1, description="rotated files kept (at least one: the file rotates into it)")


class Params(_Section):
    tracking: TrackingParams = TrackingParams()
    ingest: IngestParams
    dedup: DedupParams = DedupParams()
    split: SplitParams = SplitParams()
    balance: BalanceParams = BalanceParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    gradcam: GradcamParams = GradcamParams()
    export: ExportParams = ExportParams()
    predict: PredictParams = PredictParams()
    serve: ServeParams = ServeParams()
    audit: AuditParams = AuditParams()

    @field_validator("split")
    @classmethod
    def _room_for_training(cls, value: SplitParams) -> SplitParams:
        if value.val + value.test >= 1:
            raise ValueError("val + test must leave a training share (sum < 1)")
        return value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    return f"'{key}': {error['msg']} (got {error.get('input')!r})"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file; raise ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{path}: {problems}") from None


def is_utf8(name: str) -> bool:
    """Whether a name os.walk found is text: bytes it could not decode come back as surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str | Path) -> str:
    """A path as text that any terminal or file takes: bytes that are not UTF-8 as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unhashable_files(folder: str | Path) -> list[tuple[Path, str]]:
    """What DVC cannot hash under `folder`, each with why: named pipes, sockets and devices, also
    behind a link (reading one blocks or never ends), links to nothing, and names that are not
    UTF-8. Links are followed to see what they lead to, not into (no loops)."""
    found = []
    for current, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            path = Path(current) / name
            if not is_utf8(name):
                found.append((path, "a name that is not valid UTF-8"))
                continue
            link = path.is_symlink()
            try:
                mode = os.stat(path).st_mode  # follows a link
            except OSError:
                found.append((path, "a link to nothing" if link else "unreadable"))
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append(
                    (path, "a link to a named pipe, socket or device" if link else "a named pipe, socket or device")
                )
    return sorted(found)


def check_folders(params: Params) -> None:
    """Raise ParamsError for a folder that params.yaml names but that does not exist, and for
    entries of ingest.source that DVC cannot hash (`unhashable_files`): DVC reads every file of
    that folder before the ingest stage could reject one, and reading a named pipe blocks forever."""
    named = {
        "ingest.source": params.ingest.source,
        "evaluate.external": params.evaluate.external,
        "gradcam.annotated": params.gradcam.annotated,
        "train.localisation.boxes": params.train.localisation.boxes,
    }
    for key, folder in named.items():
        if folder is not None and not Path(folder).is_dir():
            raise ParamsError(f"{key}: folder '{folder}' does not exist")
    labels = params.ingest.labels_csv
    if labels is not None and not (Path(params.ingest.source) / labels).is_file():
        raise ParamsError(f"ingest.labels_csv: no file '{labels}' in ingest.source '{params.ingest.source}'")
    unhashable = unhashable_files(params.ingest.source)
    if unhashable:
        listed = "; ".join(f"'{printable(path)}' ({why})" for path, why in unhashable[:5])
        raise ParamsError(
            f"ingest.source: {len(unhashable)} entries that DVC cannot hash (it would block, loop or fail on "
            f"them before any stage runs): {listed}{' ...' if len(unhashable) > 5 else ''}; remove, rename "
            "or move them out of the folder"
        )


def flatten(section: BaseModel, prefix: str) -> dict[str, Any]:
    """`{'train.lr': 0.001, 'balance.augment.flip': True, ...}` for logging."""
    return _flatten_dict(section.model_dump(), prefix)


def _flatten_dict(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        flat.update(_flatten_dict(value, name) if isinstance(value, dict) else {name: value})
    return flat
