"""Labels from a table instead of folder names (`ingest.labels_csv`), as TCIA and
BraTS-style collections ship them: one row per file, patient, study or series.

The table names patients by their raw IDs; they are matched through the same
salted hashes the manifest holds, and never written anywhere."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainmri.core.errors import DataError
from brainmri.data.scanner import hashed_key, recorded_file

KEY_KINDS = ("path", "patient", "study", "series")


def read_label_table(path: str | Path) -> tuple[str, pd.DataFrame]:
    """(key kind, table of key, label and, beside paths, the patient when given). Raises DataError
    naming the file for a table without a `label` column and exactly one key column (path, patient,
    study or series; a `patient` column beside `path` names the file's patient instead)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"ingest.labels_csv: cannot read '{path}': {error}") from None
    keys = [column for column in KEY_KINDS if column in table.columns]
    if keys[:2] == ["path", "patient"] and len(keys) == 2:
        return "path", table[["path", "label", "patient"]].rename(columns={"path": "key"})
    if "label" not in table.columns or len(keys) != 1:
        raise DataError(
            f"ingest.labels_csv: '{path}' needs a 'label' column and exactly one key column of {list(KEY_KINDS)}, "
            f"found {list(table.columns)}"
        )
    return keys[0], table[[keys[0], "label"]].rename(columns={keys[0]: "key"})


def table_rejects(table: pd.DataFrame, name: str) -> tuple[pd.DataFrame, list[dict]]:
    """The table's usable rows, and a reject per unlabelled row (named by its line, never its key)."""
    unusable = (table["key"].str.strip() == "") | (table["label"].str.strip() == "")
    rejects = [
        {"path": f"{name} line {index + 2}", "label": "", "reason": "ingest.labels_csv row without a key or label"}
        for index in table.index[unusable]
    ]
    return table[~unusable], rejects


def assign_labels(
    images: pd.DataFrame, kind: str, table: pd.DataFrame, salt: bytes, hash_paths: bool
) -> tuple[pd.DataFrame, list[dict]]:
    """`images` with the label of its key (its path without the slice index, or its hashed
    patient, study or series); rows whose key has no label, or several, become rejects."""
    if kind == "path":
        row_keys = images["path"].map(recorded_file)
        table_keys = table["key"].map(lambda path: hashed_key(path, salt) if hash_paths else path)
    else:
        row_keys = images[kind]
        table_keys = table["key"].map(lambda value: hashed_key(value, salt))
    labels = pd.DataFrame({"key": table_keys, "label": table["label"].str.strip()}).drop_duplicates()
    per_key = labels.groupby("key")["label"].agg(lambda found: sorted(set(found)))
    found = row_keys.map(per_key)
    unlabelled = found.isna() | (row_keys == "")
    conflicting = ~unlabelled & (found.map(lambda value: len(value) if isinstance(value, list) else 0) > 1)
    rejects = [
        {"path": path, "label": "", "reason": f"no label for its {kind} in ingest.labels_csv"}
        for path in images.loc[unlabelled, "path"]
    ] + [
        {"path": path, "label": "", "reason": f"conflicting labels for its {kind} in ingest.labels_csv"}
        for path in images.loc[conflicting, "path"]
    ]
    usable = ~unlabelled & ~conflicting
    labelled = images[usable].assign(label=found[usable].map(lambda value: value[0]))
    if "patient" in table.columns:  # e.g. BraTS: the four sequences of a case are one patient
        patients = pd.Series(table["patient"].map(lambda value: hashed_key(value, salt)).to_numpy(), index=table_keys)
        patients = patients[~patients.index.duplicated()]
        named = row_keys[usable].map(patients).fillna("")
        labelled = labelled.assign(patient=named.where(named != "", labelled["patient"]))
    return labelled, rejects
