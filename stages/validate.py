"""validate: check the whole params.yaml, and the folders it names, before
anything else runs.

DVC deletes a stage's outputs just before it runs the stage's command. Every
other stage depends on this one's output, so a typo or a missing folder stops
`dvc repro` here, with the key named, while every built output is still in
place. The output's content never changes, so passing the check reruns
nothing downstream by itself."""

from brainmri.core.errors import run_entry_point
from brainmri.core.params import check_folders, load_params
from brainmri.core.paths import VALIDATED


def main() -> None:
    check_folders(load_params())
    VALIDATED.parent.mkdir(parents=True, exist_ok=True)
    VALIDATED.write_text("params.yaml and the folders it names are valid\n")
    print("validate: params.yaml is valid")


if __name__ == "__main__":
    run_entry_point(main)
