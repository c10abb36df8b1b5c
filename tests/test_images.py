import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from brainmri.core.images import (
    DecodeLimits,
    ImageTooLarge,
    content_box,
    load_array,
    normalise_mode,
    open_image,
    otsu_level,
    to_array,
)
from brainmri.serve.inference import decode_bytes


def test_every_mode_becomes_8_bit_grey_or_rgb():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    modes = {
        "RGBA": grey.convert("RGBA"),
        "P": grey.convert("P"),
        "CMYK": grey.convert("CMYK"),
        "1": grey.convert("1"),
        "LA": grey.convert("LA"),
    }
    for name, image in modes.items():
        assert normalise_mode(image).mode in ("L", "RGB"), name


def test_16_bit_scans_are_stretched_to_the_full_range():
    pixels = np.linspace(1000, 3000, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(normalise_mode(Image.fromarray(pixels)))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_a_large_16_bit_scan_is_stretched_as_in_float64_without_full_size_copies():
    pixels = np.random.default_rng(0).integers(200, 60_000, (2000, 2000), dtype=np.uint16)
    scan = Image.fromarray(pixels)
    tracemalloc.start()
    try:
        stretched = normalise_mode(scan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * pixels.nbytes  # the 8-bit result and one band; a 16-bit copy of the whole would add 1x
    out = np.asarray(stretched)
    low, high = float(pixels.min()), float(pixels.max())
    assert np.array_equal(out, np.round((pixels.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8))
    floats = np.linspace(-1.5, 2.5, 64, dtype=np.float32).reshape(8, 8)
    assert np.array_equal(
        np.asarray(normalise_mode(Image.fromarray(floats))), np.round(np.linspace(0, 255, 64)).reshape(8, 8)
    )


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
    assert open_image(path).size == (10, 20)
    uploaded = decode_bytes(path.read_bytes(), DecodeLimits(10**6, 1000, 10, 10**6))
    assert uploaded.size == (10, 20)  # turned where it was decoded, not on a copy


def test_non_square_images_are_padded_not_stretched():
    wide = Image.new("L", (40, 20), 200)
    array = to_array(wide, 20, 1)
    assert array.shape == (20, 20, 1)
    assert array[0, 10, 0] == 0 and array[10, 10, 0] == 200  # black bands above and below


def test_a_long_thin_image_is_resized_before_it_is_padded():
    # Padding first would build a 60000 x 60000 square (3.6 GB) before shrinking it.
    # The peak resident memory of a fresh process (VmHWM; ru_maxrss would carry pytest's over the exec).
    code = (
        "import re; from PIL import Image; from brainmri.core.images import to_array; "
        "a = to_array(Image.new('L', (60000, 1), 200), 128, 1); "
        "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print(a.shape, a[63, :, 0].min(), a[0, 0, 0], peak)"
    )
    shape, line_value, corner, peak_kb = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.rsplit(" ", 3)
    assert shape == "(128, 128, 1)" and int(line_value) > 0 and int(corner) == 0
    assert int(peak_kb) < 300_000


def test_limits_name_what_a_header_declares_too_much_of():
    limits = DecodeLimits(max_pixels=1000, max_side=100, max_aspect=4, max_decoded_bytes=2**20)
    limits.check(40, 10)  # within every limit
    refused = {
        (40, 40): "more than the 1,000 pixels allowed (ingest.max_pixels)",
        (101, 5): "a side longer than the 100 allowed (ingest.max_side)",
        (41, 10): "more elongated than the 4 to 1 allowed (ingest.max_aspect)",
    }
    for size, reason in refused.items():
        with pytest.raises(ImageTooLarge, match=re.escape(f"{size[0]}x{size[1]} pixels: {reason}")) as raised:
            limits.check(*size)
        assert "ingest." not in raised.value.plain  # the words the web page shows


def test_grey_and_rgb_files_load_to_the_requested_channels(dataset):
    for path in (dataset / "glioma" / "glioma_000.jpg", dataset / "glioma" / "glioma_001.png"):
        assert load_array(path, 32, 1).shape == (32, 32, 1)
        assert load_array(path, 32, 3).shape == (32, 32, 3)


def test_the_head_crop_finds_the_head_whatever_the_margins_and_ignores_burnt_in_text():
    pixels = np.zeros((300, 500), dtype=np.uint8)
    pixels[50:250, 150:330] = 120  # head
    pixels[5:9, 470:490] = 255  # a burnt-in label
    image = Image.fromarray(pixels)
    assert content_box(image, "head") == (150, 50, 330, 250)
    assert content_box(image, "none") == (0, 0, 500, 300)
    assert content_box(Image.new("L", (40, 30)), "head") == (0, 0, 40, 30)  # nothing found: all of it
    cropped = to_array(image, 64, 1, "head")[..., 0]
    assert (cropped[:, 3:-3] > 100).all()  # the head is as tall as the input; the narrower side is centred
    assert (to_array(image, 64, 1)[..., 0] > 100).mean() < 0.3


def test_otsu_splits_a_two_level_image_between_its_levels():
    grey = np.full((10, 10), 20, dtype=np.uint8)
    grey[:, 5:] = 200
    assert 20 <= otsu_level(grey) < 200
    assert otsu_level(np.zeros((4, 4), dtype=np.uint8)) == 0  # one level: nothing to split
