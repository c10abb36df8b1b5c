import numpy as np
from PIL import Image

from brainmri.images import load_array, normalise_mode, open_image, to_array


def test_every_mode_becomes_8_bit_grey_or_rgb():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    modes = {
        "RGBA": grey.convert("RGBA"), "P": grey.convert("P"), "CMYK": grey.convert("CMYK"),
        "1": grey.convert("1"), "LA": grey.convert("LA"),
    }
    for name, image in modes.items():
        assert normalise_mode(image).mode in ("L", "RGB"), name


def test_16_bit_scans_are_stretched_to_the_full_range():
    pixels = np.linspace(1000, 3000, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(normalise_mode(Image.fromarray(pixels)))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_transparent_background_becomes_black():
    image = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert np.asarray(normalise_mode(image)).max() == 0


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("L", (20, 10), 0)
    image.paste(255, (0, 0, 5, 10))  # bright stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° turn
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    shown = open_image(path)
    assert shown.size == (10, 20)


def test_non_square_images_are_padded_not_stretched():
    wide = Image.new("L", (40, 20), 200)
    array = to_array(wide, 20, 1)
    assert array.shape == (20, 20, 1)
    assert array[0, 10, 0] == 0 and array[10, 10, 0] == 200  # black bands above and below


def test_grey_and_rgb_files_load_to_the_requested_channels(dataset):
    for path in (dataset / "glioma" / "glioma_000.jpg", dataset / "glioma" / "glioma_001.png"):
        assert load_array(path, 32, 1).shape == (32, 32, 1)
        assert load_array(path, 32, 3).shape == (32, 32, 3)
