"""Ingest: find every labelled image under a source folder, decode it fully,
and record what it is; anything that cannot be trusted goes to the rejects.

Three layouts are understood:

- folder per class, at any depth: ``source/<class>/**/<image>``;
- split folders above the class folders, as in the Kaggle download:
  ``source/Training/<class>/...`` + ``source/Testing/<class>/...`` (the split
  folder is recorded as ``subset``);
- YOLO: ``source/images/**/<name>.jpg`` + ``source/labels/**/<name>.txt``
  whose lines are ``class_id cx cy w h``; the image's label is its first box's
  class, named by ``ingest.classes``, and all boxes are kept in the manifest.

In the folder layouts a YOLO label file beside an image (``<name>.txt`` next
to ``<name>.jpg``) adds its boxes to the manifest; the folder names the class.

Scanner files in the class folders (DICOM, found by their preamble whatever
their name, and NIfTI volumes) give one manifest row per slice, named
``<file>#<index>``, with the patient, study and series as salted hashes
(`brainmri.data.scanner`); the 8-bit slices are written once under
``data/interim/slices`` for the stages after ingest.
"""

from __future__ import annotations

import os
import shutil
import stat
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from brainmri.core.errors import DataError
from brainmri.core.images import DecodeLimits, ImageTooLarge, open_image, sha256_file, slice_file
from brainmri.core.manifest import KEY_COLUMNS, MANIFEST_COLUMNS, REJECT_COLUMNS
from brainmri.core.params import IngestParams, is_utf8, printable
from brainmri.data.labels import assign_labels, read_label_table, table_rejects
from brainmri.data.scanner import (
    ScannerFileError,
    ScannerOptions,
    hashed_key,
    is_scanner_file,
    key_salt,
    read_scanner_file,
    slice_path,
)

OUTSIDE_LINK = "link points outside the source tree"
SPLIT_FOLDER_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation"}
# Pixels at or below this grey level count as background (MRI air is near 0).
BLACK_LEVEL = 10


@dataclass(frozen=True)
class Candidate:
    path: str
    label: str
    subset: str = ""
    boxes: str = ""  # YOLO boxes, "class cx cy w h" joined by ";"
    scanner: bool = False  # a DICOM file or NIfTI volume, told once when the folder is walked


@dataclass(frozen=True)
class Scan:
    images: pd.DataFrame
    rejects: pd.DataFrame
    layout: str


BLANK = "blank: every pixel has the same value"


def without_source_folder(reason: str, source: str | Path) -> str:
    """A reject reason with the source folder's own path taken out of any path a library quoted in it:
    what is recorded names files relative to the source, never one machine's folders."""
    for folder in {str(source), os.path.abspath(source), os.path.realpath(source)}:
        reason = reason.replace(folder.rstrip("/") + "/", "")
    return reason


def relative_to_source(path: str, source: str | Path) -> str:
    """A found file's path as the manifests record it: relative to the source folder."""
    return Path(path).relative_to(source).as_posix()


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(root)


NOT_UTF8 = "a name that is not valid UTF-8 (manifests, CSV files and DVC need text names): rename it"


def _walk(folder: Path, root: Path, extensions: set[str], rejects: list[dict], label: str) -> list[tuple[Path, bool]]:
    """Image and scanner files below `folder`, sorted, each with whether it is a scanner file.
    Links leading outside `root` and files of other extensions are rejected with the reason,
    never followed or skipped in silence."""
    found = []
    for current, dirs, names in os.walk(folder):
        current_path = Path(current)
        for name in sorted(name for name in [*dirs, *names] if not is_utf8(name)):
            rejects.append({"path": printable(current_path / name), "label": label, "reason": NOT_UTF8})
        dirs[:], names[:] = [d for d in dirs if is_utf8(d)], [n for n in names if is_utf8(n)]
        for name in sorted(dirs):
            if (current_path / name).is_symlink() and not _inside(current_path / name, root):
                rejects.append({"path": (current_path / name).as_posix(), "label": label, "reason": OUTSIDE_LINK})
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (current_path / d).is_symlink())
        # A YOLO label file beside an image of the same name is read with that image.
        image_stems = {Path(name).stem for name in names if Path(name).suffix.lower() in extensions}
        for name in names:
            path = current_path / name
            if name.startswith(".") or (path.suffix.lower() == ".txt" and path.stem in image_stems):
                continue
            # Regular files only: reading a named pipe's preamble would block.
            scanner = path.is_file() and is_scanner_file(path)
            if path.suffix.lower() not in extensions and not scanner:
                reason = f"extension '{path.suffix}' is not in ingest.extensions"
                rejects.append({"path": path.as_posix(), "label": label, "reason": reason})
            elif path.is_symlink() and not _inside(path, root):
                rejects.append({"path": path.as_posix(), "label": label, "reason": OUTSIDE_LINK})
            else:
                found.append((path, scanner))
    return sorted(found)


def _class_folders(parent: Path, wanted: list[str] | None) -> list[Path]:
    present = sorted(d for d in parent.iterdir() if d.is_dir() and not d.name.startswith("."))
    if wanted is None:
        return present
    missing = [name for name in wanted if not (parent / name).is_dir()]
    if missing:
        raise DataError(f"ingest.classes: no folder for {missing} in '{parent}'")
    return [parent / name for name in wanted]


def read_yolo_boxes(label_file: Path) -> str:
    """The boxes of a YOLO label file as "class cx cy w h" joined by ';'.

    Raises FileNotFoundError, or ValueError for a line that is not five numbers."""
    boxes = []
    for line in label_file.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise ValueError(f"'{line}' is not 'class cx cy w h'")
        class_id, *geometry = int(fields[0]), *map(float, fields[1:])
        boxes.append(f"{class_id} " + " ".join(f"{value:.6g}" for value in geometry))
    return ";".join(boxes)


def _yolo_candidates(
    source: Path, params: IngestParams, root: Path, extensions: set[str], rejects: list[dict]
) -> list[Candidate]:
    if not params.classes:
        raise DataError(f"'{source}' has the YOLO layout (images/ + labels/): set ingest.classes to name the class ids")
    candidates = []
    for image, scanner in _walk(source / "images", root, extensions, rejects, ""):
        relative = image.relative_to(source / "images")
        label_file = (source / "labels" / relative).with_suffix(".txt")
        subset = relative.parts[0] if len(relative.parts) > 1 else ""
        reason, boxes = None, ""
        try:
            boxes = read_yolo_boxes(label_file)
        except FileNotFoundError:
            reason = f"no label file {label_file.relative_to(source).as_posix()}"
        except ValueError:
            reason = f"malformed label file {label_file.relative_to(source).as_posix()}"
        else:
            class_ids = [int(box.split()[0]) for box in boxes.split(";") if box]
            if not class_ids:
                reason = "label file has no boxes: class unknown"
            elif not all(0 <= class_id < len(params.classes) for class_id in class_ids):
                reason = f"class id outside ingest.classes (0..{len(params.classes) - 1})"
        if reason:
            rejects.append({"path": image.as_posix(), "label": "", "reason": reason})
            continue
        candidates.append(Candidate(image.as_posix(), params.classes[class_ids[0]], subset, boxes, scanner))
    return candidates


def _folder_candidates(
    folder: Path, root: Path, extensions: set[str], rejects: list[dict], subset: str
) -> list[Candidate]:
    """A class folder's images, each with the boxes of its YOLO label file, if it has one: beside
    the image, or in YOLO's per-class layout `<class>/images/**/x.jpg` + `<class>/labels/**/x.txt`.
    The folder names the class, so an empty label file means an image without a box."""
    per_class_yolo = (folder / "images").is_dir() and (folder / "labels").is_dir()
    candidates = []
    for image, scanner in _walk(
        folder / "images" if per_class_yolo else folder, root, extensions, rejects, folder.name
    ):
        label_file = image.with_suffix(".txt")
        if per_class_yolo:
            label_file = (folder / "labels" / image.relative_to(folder / "images")).with_suffix(".txt")
        try:
            boxes = read_yolo_boxes(label_file) if label_file.is_file() else ""
        except ValueError:
            rejects.append(
                {
                    "path": image.as_posix(),
                    "label": folder.name,
                    "reason": f"malformed label file {label_file.name}",
                }
            )
            continue
        candidates.append(Candidate(image.as_posix(), folder.name, subset, boxes, scanner))
    return candidates


def discover(params: IngestParams) -> tuple[list[Candidate], list[dict], str, list[str]]:
    """Every labelled image file under `ingest.source`, the link rejects, the layout and the classes."""
    source = Path(params.source)
    if not source.is_dir():
        raise DataError(f"ingest.source: folder '{source}' does not exist")
    root = Path(os.path.realpath(source))
    extensions = {ext.lower() for ext in params.extensions}
    rejects: list[dict] = []
    if params.labels_csv:  # labels from the table: every file below the source, labelled after decoding
        table = (source / params.labels_csv).as_posix()
        walked = _walk(source, root, extensions, rejects, "")
        found = [Candidate(path.as_posix(), "", scanner=scanner) for path, scanner in walked]
        return found, [reject for reject in rejects if reject["path"] != table], "labels-csv", []
    if (source / "images").is_dir() and (source / "labels").is_dir():
        return _yolo_candidates(source, params, root, extensions, rejects), rejects, "yolo", list(params.classes)

    top = [d for d in sorted(source.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    split_layout = bool(top) and all(d.name.lower() in SPLIT_FOLDER_NAMES for d in top)
    parents = [(d, d.name) for d in top] if split_layout else [(source, "")]
    candidates, classes = [], set()
    for parent, subset in parents:
        for folder in _class_folders(parent, params.classes):
            classes.add(folder.name)
            candidates += _folder_candidates(folder, root, extensions, rejects, subset)
    return candidates, rejects, "split-folders" if split_layout else "folder-per-class", sorted(classes)


def decode_limits(params: IngestParams) -> DecodeLimits:
    """What an image header may declare before decoding, for ingest, predict and serve alike."""
    return DecodeLimits(params.max_pixels, params.max_side, params.max_aspect, params.max_decoded_bytes)


@dataclass(frozen=True)
class Recorder:
    """How ingest records a found file: its path relative to the source (or, with `hash_paths`,
    a salted hash of it), and where the pixels of scanner slices (and, with `hash_paths`, of
    every image) are written for the stages after ingest."""

    source: str
    options: ScannerOptions
    salt: bytes
    slices: Path | None  # None: scanner files are rejected (an external test folder)
    hash_paths: bool = False

    def path(self, found: str) -> str:
        relative = relative_to_source(found, self.source)
        return hashed_key(relative, self.salt) if self.hash_paths else relative

    def pixels(self, recorded: str, image: Image.Image) -> Path:
        """Write an image as the PNG that `brainmri.core.images.source_file` finds for `recorded`."""
        target = slice_file(recorded, self.slices)
        image.save(target, format="PNG", compress_level=1)  # lossless either way; the fastest level
        return target


def scanner_options(params: IngestParams) -> ScannerOptions:
    """ingest.dicom and ingest.nifti as `brainmri.data.scanner` reads them, for ingest, predict and serve alike."""
    d, n = params.dicom, params.nifti
    return ScannerOptions(
        d.window,
        tuple(d.percentiles),
        tuple(d.modalities),
        n.axis,
        n.volume,
        n.slices,
        n.middle,
        n.min_foreground,
        tuple(n.percentiles),
    )


def _describe(grey: Image.Image) -> dict:
    """The figures every manifest row carries about its pixels."""
    pixels = np.asarray(grey, dtype=np.float32)
    return {
        "width": grey.width,
        "height": grey.height,
        "brightness": round(float(pixels.mean()), 3),
        "contrast": round(float(pixels.std()), 3),
        "black_fraction": round(float((pixels <= BLACK_LEVEL).mean()), 4),
        "phash": str(imagehash.phash(grey)),
    }


def inspect_scanner_file(candidate: Candidate, limits: DecodeLimits, recorder: Recorder) -> list[dict]:
    """One manifest row per slice of a DICOM file or NIfTI volume, each slice written as an 8-bit
    PNG; or one row with the `reason` to reject the file."""
    recorded = recorder.path(candidate.path)
    row = {"path": recorded, "label": candidate.label}
    if recorder.slices is None:
        return [{**row, "reason": "a scanner file (DICOM or NIfTI): only ingest.source may hold them"}]
    relative = relative_to_source(candidate.path, recorder.source)
    try:
        slices = read_scanner_file(candidate.path, recorder.options, limits, recorder.salt, relative)
    except ScannerFileError as error:
        return [{**row, "reason": str(error)}]
    if not slices:
        return [{**row, "reason": "no slice passes ingest.nifti.slices"}]
    rows = []
    for found in slices:
        name = slice_path(recorded, found.index)
        described = _describe(found.image)
        if described["contrast"] == 0:  # e.g. a volume of zeros, NaN or inf: nothing to learn from
            rows.append({**row, "path": name, "reason": BLANK})
            continue
        target = recorder.pixels(name, found.image)
        rows.append(
            {
                "path": name,
                "label": candidate.label,
                "subset": candidate.subset,
                "sha256": sha256_file(target),
                "bytes": target.stat().st_size,
                "mode": "L",
                **described,
                "boxes": "",
                **found.keys,
            }
        )
    return rows


def inspect(candidate: Candidate, limits: DecodeLimits, recorder: Recorder) -> list[dict]:
    """Decode one file fully: its manifest rows (one per slice of a scanner file), or one row
    with a `reason` to reject it."""
    path = Path(candidate.path)
    row = {"path": recorder.path(candidate.path), "label": candidate.label}
    try:
        status = path.stat()
    except OSError as exc:  # e.g. a link to a file that does not exist
        return [{**row, "reason": f"cannot read: {exc.strerror}"}]
    if not stat.S_ISREG(status.st_mode):  # never opened: reading a named pipe would block
        return [{**row, "reason": "not a regular file (a named pipe, socket or device)"}]
    size = status.st_size
    if size == 0:
        return [{**row, "reason": "empty file"}]
    if candidate.scanner:
        return inspect_scanner_file(candidate, limits, recorder)
    try:
        with Image.open(path) as header:  # reads the header only
            mode = header.mode
        image = open_image(path, limits)  # a decompression bomb is never expanded
    except ImageTooLarge as exc:
        return [{**row, "reason": str(exc)}]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return [{**row, "reason": f"cannot decode: {exc}"}]
    described = _describe(image.convert("L"))
    if described["contrast"] == 0:
        return [{**row, "reason": BLANK}]
    if recorder.hash_paths:  # the source path is not recorded, so the pixels travel under the hashed one
        recorder.pixels(row["path"], image)
    keys = dict.fromkeys(KEY_COLUMNS, "")
    return [
        {
            **row,
            "subset": candidate.subset,
            "sha256": sha256_file(path),
            "bytes": size,
            "mode": mode,
            **described,
            "boxes": candidate.boxes,
            **keys,
        }
    ]


def _inspect_star(args: tuple[Candidate, DecodeLimits, Recorder]) -> list[dict]:
    return inspect(*args)


def inspect_all(candidates: list[Candidate], limits: DecodeLimits, workers: int, recorder: Recorder) -> list[dict]:
    """Decode in worker processes (decoding is CPU-bound); rows keep the input order."""
    workers = workers or os.cpu_count() or 1
    jobs = [(candidate, limits, recorder) for candidate in candidates]
    if workers == 1 or len(jobs) < 64:
        return [row for job in jobs for row in _inspect_star(job)]
    with ProcessPoolExecutor(workers) as pool:
        chunks = pool.map(_inspect_star, jobs, chunksize=max(16, len(jobs) // (workers * 8)))
        return [row for rows in chunks for row in rows]


def _robust_z(values: pd.Series) -> pd.Series:
    median = values.median()
    mad = (values - median).abs().median() * 1.4826
    return (values - median).abs() / mad if mad > 0 else pd.Series(0.0, index=values.index)


def flag_outliers(images: pd.DataFrame, params: IngestParams) -> pd.Series:
    """Reasons an image looks unlike the rest (kept, but listed in the data report)."""
    limits = params.outliers
    reasons = pd.Series([[] for _ in range(len(images))], index=images.index, dtype=object)
    short_side = images[["width", "height"]].min(axis=1)
    aspect = images[["width", "height"]].max(axis=1) / short_side
    checks = {
        f"short side < {limits.min_side}px": short_side < limits.min_side,
        f"aspect ratio > {limits.max_aspect}": aspect > limits.max_aspect,
        f"brightness beyond {limits.brightness_z} robust SD": _robust_z(images["brightness"]) > limits.brightness_z,
        f"contrast beyond {limits.contrast_z} robust SD": _robust_z(images["contrast"]) > limits.contrast_z,
    }
    for reason, mask in checks.items():
        for index in images.index[mask]:
            reasons[index] = reasons[index] + [reason]
    return reasons.map("; ".join)


def _labels_from_table(
    images: pd.DataFrame, params: IngestParams, recorder: Recorder
) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """Label every decoded row from ingest.labels_csv; the classes are the table's labels (or ingest.classes)."""
    kind, table = read_label_table(Path(params.source) / params.labels_csv)
    table, rejects = table_rejects(table, params.labels_csv)
    images, unlabelled = assign_labels(images, kind, table, recorder.salt, recorder.hash_paths)
    rejects += unlabelled
    labels = params.classes or sorted(set(table["label"].str.strip()))
    if params.classes:
        outside = ~images["label"].isin(params.classes)
        rejects += [
            {"path": path, "label": label, "reason": "label not in ingest.classes"}
            for path, label in zip(images.loc[outside, "path"], images.loc[outside, "label"])
        ]
        images = images[~outside]
    return images, labels, rejects


def scan(params: IngestParams, min_classes: int = 2, slices: Path | None = None) -> Scan:
    """Discover, decode and check every image; `min_classes` is 1 for an extra test folder.
    Scanner files' slices are written under `slices` (None: scanner files are rejected)."""
    candidates, rejects, layout, labels = discover(params)
    if slices is not None:
        shutil.rmtree(slices, ignore_errors=True)
        slices.mkdir(parents=True)
    # The salt is read (made on first use) only for data that has scanner files, or hashed paths.
    needs_salt = params.hash_paths or any(candidate.scanner for candidate in candidates)
    # Paths relative to the source: no machine's folder layout in any output, and the same
    # manifests wherever the data is kept.
    recorder = Recorder(params.source, scanner_options(params), key_salt() if needs_salt else b"", slices)
    if params.hash_paths:
        if slices is None:
            raise DataError("ingest.hash_paths: an extra test folder cannot be read with hashed paths")
        recorder = replace(recorder, hash_paths=True)
    rejects = [{**reject, "path": recorder.path(reject["path"])} for reject in rejects]
    rows = inspect_all(candidates, decode_limits(params), params.workers, recorder)
    rejects += [{key: row[key] for key in REJECT_COLUMNS} for row in rows if "reason" in row]
    images = pd.DataFrame([row for row in rows if "reason" not in row], columns=MANIFEST_COLUMNS[:-1])
    if params.labels_csv:
        images, labels, more_rejects = _labels_from_table(images, params, recorder)
        rejects += more_rejects
    images["outlier"] = flag_outliers(images, params) if len(images) else pd.Series(dtype=str)
    images = images.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    rejects_frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("path", kind="mergesort")
    rejects_frame["reason"] = rejects_frame["reason"].map(partial(without_source_folder, source=params.source))

    counts = images["label"].value_counts()
    short = {label: int(counts.get(label, 0)) for label in labels if counts.get(label, 0) < params.min_per_class}
    if short:
        details = ", ".join(f"'{label}' has {n}" for label, n in short.items())
        raise DataError(
            f"too few readable images in '{params.source}' (ingest.min_per_class={params.min_per_class}): {details}"
        )
    if len(labels) < min_classes:
        raise DataError(f"'{params.source}' must hold at least {min_classes} class folders, found {labels}")
    return Scan(images, rejects_frame.reset_index(drop=True), layout)


def recorded_paths(paths: pd.Series, params: IngestParams) -> list[str]:
    """How outputs name the files of another folder (evaluate.external, gradcam.annotated): as ingest
    names the source's, by their relative path or, with `ingest.hash_paths`, a salted hash of it."""
    if not params.hash_paths:
        return list(paths)
    salt = key_salt()
    return [hashed_key(path, salt) for path in paths]


@dataclass(frozen=True)
class BoxFolder:
    boxed: pd.DataFrame  # manifest rows (paths relative to the folder) of the images that carry a box
    rejects: pd.DataFrame  # files that could not be used, with the reason
    unboxed: int  # readable images without a box


def read_box_folder(params: IngestParams, folder: str, classes: list[str], key: str) -> BoxFolder:
    """The box-annotated images of `folder` (the param `key` names it), read and checked like ingest
    reads its source: a folder per class with a YOLO file beside each image (the folder names the
    class), or YOLO's images/ + labels/ with class ids named by `ingest.classes`."""
    yolo = (Path(folder) / "images").is_dir() and (Path(folder) / "labels").is_dir()
    update = {"source": folder, "classes": params.classes if yolo else None, "min_per_class": 1, "hash_paths": False}
    found = scan(params.model_copy(update=update), min_classes=1)
    unknown = sorted(set(found.images["label"]) - set(classes))
    if unknown:
        raise DataError(f"{key}: classes {unknown} in '{folder}' are not among the model's classes {classes}")
    boxed = found.images[found.images["boxes"] != ""].reset_index(drop=True)
    if boxed.empty:
        raise DataError(f"{key}: no image in '{folder}' has a YOLO box")
    return BoxFolder(boxed, found.rejects, len(found.images) - len(boxed))
