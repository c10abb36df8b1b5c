import shutil

import numpy as np
import pandas as pd
from PIL import Image

from brainmri.core.params import DedupParams, IngestParams
from brainmri.data.dedup import candidate_pairs, find_duplicates
from brainmri.data.ingest import scan

from helpers import synthetic_image

DEFAULTS = DedupParams()


def dedup(folder):
    manifest = scan(IngestParams(source=str(folder), workers=1)).images
    return manifest, find_duplicates(
        manifest, True, DEFAULTS.hash_distance, DEFAULTS.min_correlation, workers=1, root=folder
    )


def actions(result) -> dict[str, str]:
    return dict(zip(result.groups["path"].str.rsplit("/", n=1).str[-1], result.groups["action"]))


def test_multi_index_search_finds_exactly_the_close_pairs():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, dtype=np.uint64)
    hashes[10] = hashes[3] ^ np.uint64(0b101001)  # 3 bits apart
    hashes[20] = hashes[7] ^ np.uint64((1 << 63) | 1)  # 2 bits apart, at both ends
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for limit in (0, 2, 3, 6):
        brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(distances <= limit, k=1)))}
        assert set(map(tuple, candidate_pairs(hashes, limit).tolist())) == brute


def test_exact_reencoded_and_rescaled_copies_are_one_group(dataset):
    folder = dataset / "glioma"
    shutil.copy(folder / "glioma_000.jpg", folder / "glioma_000_copy.jpg")
    Image.open(folder / "glioma_000.jpg").save(folder / "glioma_000_reencoded.jpg", quality=70)
    Image.open(folder / "glioma_000.jpg").resize((40, 40), Image.Resampling.LANCZOS).save(
        folder / "glioma_000_rescaled.png"
    )
    manifest, result = dedup(dataset)
    found = actions(result)
    assert found == {
        "glioma_000.jpg": "kept",  # the first path of the group
        "glioma_000_copy.jpg": "dropped: exact duplicate",
        "glioma_000_reencoded.jpg": "dropped: near duplicate",
        "glioma_000_rescaled.png": "dropped: near duplicate",
    }
    assert len(result.kept) == len(manifest) - 3
    assert result.kept["group"].is_unique


def test_different_slices_of_one_class_are_not_merged(dataset):
    # Every synthetic image of a class has its blob in the same quadrant, moved by a
    # few pixels, with fresh noise: similar anatomy, different slices.
    manifest, result = dedup(dataset)
    assert result.groups.empty and len(result.kept) == len(manifest)


def test_a_group_with_conflicting_labels_is_dropped_whole(dataset):
    shutil.copy(dataset / "pituitary" / "pituitary_002.jpg", dataset / "notumor" / "mislabelled.jpg")
    Image.open(dataset / "pituitary" / "pituitary_002.jpg").save(dataset / "pituitary" / "again.jpg", quality=80)
    manifest, result = dedup(dataset)
    assert set(actions(result).values()) == {"dropped: conflicting labels"}
    assert len(actions(result)) == 3
    assert not result.kept["path"].str.contains("pituitary_002|mislabelled|again").any()


def test_one_copy_is_kept_in_each_subset_for_the_split_to_judge(tmp_path):
    for subset in ("Training", "Testing"):
        for label, class_index in (("glioma", 0), ("notumor", 2)):
            (tmp_path / subset / label).mkdir(parents=True)
            for variant in range(3):
                synthetic_image(class_index, variant + (0 if subset == "Training" else 10)).save(
                    tmp_path / subset / label / f"{variant}.png"
                )
    Image.open(tmp_path / "Training" / "glioma" / "1.png").save(
        tmp_path / "Testing" / "glioma" / "leak.jpg", quality=85
    )
    _, result = dedup(tmp_path)
    group = result.groups[result.groups["path"].str.contains("leak.jpg|Training/glioma/1.png")]
    assert group["group"].nunique() == 1 and set(group["action"]) == {"kept"}
    assert isinstance(result.kept, pd.DataFrame) and (result.kept["group"] == group["group"].iloc[0]).sum() == 2


def test_copies_of_known_images_are_found_among_new_ones(dataset, tmp_path):
    from brainmri.data.dedup import copies_of_known_images

    known = scan(IngestParams(source=str(dataset), workers=1)).images
    external = tmp_path / "external"
    (external / "glioma").mkdir(parents=True)
    Image.open(dataset / "glioma" / "glioma_003.png").save(external / "glioma" / "seen_before.jpg", quality=80)
    shutil.copy(dataset / "notumor" / "notumor_000.jpg", external / "glioma" / "byte_copy.jpg")
    synthetic_image(0, 500).save(external / "glioma" / "new.png")
    candidates = scan(IngestParams(source=str(external), workers=1, min_per_class=1), min_classes=1).images
    copied = copies_of_known_images(
        candidates, known, DEFAULTS.hash_distance, DEFAULTS.min_correlation, 1, external, dataset
    )
    flags = dict(zip(candidates["path"].str.rsplit("/", n=1).str[-1], copied))
    assert flags == {"byte_copy.jpg": True, "new.png": False, "seen_before.jpg": True}


def test_an_external_folder_is_stripped_of_copies_and_named_as_ingest_names_files(dataset, tmp_path):
    from brainmri.core.params import Params
    from brainmri.data.external import external_test_set

    known = scan(IngestParams(source=str(dataset), workers=1)).images
    external = tmp_path / "external"
    (external / "glioma").mkdir(parents=True)
    shutil.copy(dataset / "glioma" / "glioma_000.jpg", external / "glioma" / "Doe_Jane_copy.jpg")
    synthetic_image(0, 500).save(external / "glioma" / "Doe_Jane_new.png")
    for hash_paths in (False, True):
        params = Params.model_validate(
            {
                "ingest": {"source": str(dataset), "workers": 1, "hash_paths": hash_paths},
                "evaluate": {"external": str(external)},
            }
        )
        found = external_test_set(params, known, ["glioma", "notumor"], 24, 1)
        assert len(found.kept) == len(found.leaked) == 1 and found.images.shape == (1, 24, 24, 1)
        named = " ".join([*found.kept["path"], *found.leaked["path"]])
        assert ("Doe_Jane" in named) != hash_paths


def test_candidate_search_in_row_blocks_finds_the_same_pairs(monkeypatch):
    from brainmri.data import dedup

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    hashes[1500:] = hashes[:1500] ^ np.uint64(0b101)  # 1,500 pairs two bits apart
    whole = dedup.candidate_pairs(hashes, 6)
    monkeypatch.setattr(dedup, "BLOCK_ROWS", 7)
    assert len(whole) >= 1500 and np.array_equal(dedup.candidate_pairs(hashes, 6), whole)
