import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from brainmri.core.params import Params, ParamsError, check_folders, flatten, load_params, unhashable_files

from helpers import PROJECT


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def project_params() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def test_project_params_file_is_valid_and_has_the_documented_keys():
    params = load_params(PROJECT / "params.yaml")
    assert params.ingest.source == "data/sample"
    assert params.train.model == "compact_cnn" and params.train.weights is None
    for key in ("epochs", "lr", "batch_size", "image_size"):
        assert getattr(params.train, key) > 0
    assert isinstance(params.split.seed, int)


def schema_defaults_differing_from(file_params: dict) -> dict:
    """{key: (schema default, file value)} for every key whose default differs from the file."""
    defaults = flatten(Params.model_validate({"ingest": {"source": file_params["ingest"]["source"]}}), "")
    written = flatten(Params.model_validate(file_params), "")
    return {key: (defaults[key], written[key]) for key in written if defaults[key] != written[key]}


def test_the_schema_defaults_are_the_values_of_params_yaml():
    # One source of truth: a key left out of params.yaml means what params.yaml says.
    file_params = project_params()
    assert schema_defaults_differing_from(file_params) == {}
    file_params["train"]["lr"] = 0.5  # the check sees a change on one side
    assert schema_defaults_differing_from(file_params) == {".train.lr": (0.002, 0.5)}


def test_unknown_key_is_named(tmp_path):
    raw = project_params()
    raw["train"]["lrr"] = 0.1
    with pytest.raises(ParamsError, match=r"unknown key 'train\.lrr'"):
        load_params(write(tmp_path, raw))


def test_unknown_section_is_named(tmp_path):
    raw = project_params()
    raw["trian"] = {"lr": 0.1}
    with pytest.raises(ParamsError, match=r"unknown key 'trian'"):
        load_params(write(tmp_path, raw))


def test_wrong_type_is_named_with_the_value(tmp_path):
    raw = project_params()
    raw["train"]["epochs"] = "many"
    with pytest.raises(ParamsError, match=r"'train\.epochs'.*'many'"):
        load_params(write(tmp_path, raw))


def test_nested_wrong_type_is_named(tmp_path):
    raw = project_params()
    raw["balance"]["augment"]["rotation"] = -5
    with pytest.raises(ParamsError, match=r"'balance\.augment\.rotation'"):
        load_params(write(tmp_path, raw))


def test_missing_source_is_named(tmp_path):
    raw = project_params()
    del raw["ingest"]["source"]
    with pytest.raises(ParamsError, match=r"missing key 'ingest\.source'"):
        load_params(write(tmp_path, raw))


def test_split_shares_must_leave_training_data(tmp_path):
    raw = project_params()
    raw["split"].update(val=0.5, test=0.5)
    with pytest.raises(ParamsError, match=r"'split'.*val \+ test"):
        load_params(write(tmp_path, raw))


def test_values_written_by_dvc_set_are_understood(tmp_path):
    # `dvc exp run -S train.lr=3e-4 -S train.weights=none` writes these strings.
    raw = project_params()
    raw["train"].update(lr="3e-4", weights="none")
    params = load_params(write(tmp_path, raw))
    assert params.train.lr == pytest.approx(3e-4)
    assert params.train.weights is None


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_flatten_names_nested_keys():
    params = load_params(PROJECT / "params.yaml")
    flat = flatten(params.balance, "balance")
    assert flat["balance.augment.flip"] is True
    assert "balance.seed" in flat


def test_cli_check_reports_valid_and_invalid_files(tmp_path, capsys):
    from brainmri.cli import main

    assert main(["check", str(PROJECT / "params.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    raw = project_params()
    raw["train"]["batch_size"] = 0
    # The library raises; the command turns it into one line on stderr and exit status 1.
    assert main(["check", str(write(tmp_path, raw))]) == 1
    assert "params error:" in capsys.readouterr().err


def test_what_dvc_cannot_hash_in_the_source_is_named_before_dvc_reads_it(tmp_path):
    source = tmp_path / "source"
    glioma = source / "glioma"
    glioma.mkdir(parents=True)
    (glioma / "a.jpg").write_bytes(b"jpeg")
    os.mkfifo(glioma / "pipe.jpg")
    os.mkfifo(tmp_path / "outside_pipe")
    (glioma / "zero.jpg").symlink_to("/dev/zero")
    (glioma / "far_pipe.jpg").symlink_to(tmp_path / "outside_pipe")
    (glioma / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (glioma / "inside.jpg").symlink_to(glioma / "a.jpg")  # fine: DVC hashes what it leads to
    odd = os.fsencode(glioma) + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(odd, "wb") as handle:
        handle.write(b"jpeg")
    params = Params.model_validate({"ingest": {"source": str(source)}})
    found = {path.name: why for path, why in unhashable_files(source)}
    assert found == {
        "pipe.jpg": "a named pipe, socket or device",
        "zero.jpg": "a link to a named pipe, socket or device",
        "far_pipe.jpg": "a link to a named pipe, socket or device",
        "gone.jpg": "a link to nothing",
        os.fsdecode(b"caf\xe9.jpg"): "a name that is not valid UTF-8",
    }
    with pytest.raises(ParamsError, match=r"ingest.source: 5 entries that DVC cannot hash") as raised:
        check_folders(params)
    assert "caf\\xe9.jpg" in str(raised.value)
    str(raised.value).encode("utf-8")  # printable anywhere
    for name in ("pipe.jpg", "zero.jpg", "far_pipe.jpg", "gone.jpg"):
        (glioma / name).unlink()
    os.unlink(odd)
    check_folders(params)


def test_a_labels_table_missing_from_the_source_is_named(tmp_path):
    params = Params.model_validate({"ingest": {"source": str(tmp_path), "labels_csv": "labels.csv"}})
    with pytest.raises(ParamsError, match="ingest.labels_csv: no file 'labels.csv'"):
        check_folders(params)
    (tmp_path / "labels.csv").write_text("patient,label\n")
    check_folders(params)


def test_a_group_pattern_needs_a_group():
    with pytest.raises(ValidationError, match="needs a group"):
        Params.model_validate({"ingest": {"source": "x"}, "split": {"group_pattern": "P\\d+"}})
