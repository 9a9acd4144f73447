"""Image checks, directly on inference.images (no HTTP)."""

import hashlib
import io

import pytest
from PIL import Image

from config.errors import ApiError
from inference.images import check_image, decode_base64_image
from tests import media


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats_by_content(fmt):
    data = media.encode(media.image(50, 40), fmt)
    checked = check_image(data)
    assert checked.format == fmt
    assert checked.image.mode == "RGB"
    assert (checked.width, checked.height) == (50, 40)
    assert checked.sha256 == hashlib.sha256(data).hexdigest()
    assert checked.size_bytes == len(data)


def test_scaled_down_to_max_side_keeping_aspect(settings):
    settings.MAX_IMAGE_SIDE = 448
    checked = check_image(media.encode(Image.new("RGB", (1000, 500), "red"), "PNG"))
    assert checked.image.size == (448, 224)
    assert (checked.width, checked.height) == (1000, 500)


def test_small_images_are_not_scaled_up():
    assert check_image(media.png(30, 20)).image.size == (30, 20)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = media.encode(img, "JPEG", exif=exif.tobytes())
    checked = check_image(data)
    assert checked.image.size == (20, 60)


def test_transparency_is_flattened_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    checked = check_image(media.encode(img, "PNG"))
    assert checked.image.mode == "RGB"
    assert checked.image.getpixel((5, 5)) == (255, 255, 255)


def test_gif_first_frame_only():
    frames = [Image.new("RGB", (20, 20), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    checked = check_image(buffer.getvalue())
    r, g, b = checked.image.getpixel((10, 10))
    assert r > 200 and g < 50 and b < 50


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "invalid_image"),
        (b"GIF89a but not really", "invalid_image"),
        (b"%PDF-1.4 not an image", "invalid_image"),
    ],
)
def test_garbage_is_invalid_image(data, code):
    with pytest.raises(ApiError) as info:
        check_image(data)
    assert info.value.code == code


def test_pixel_limit_is_checked_before_decoding(settings):
    settings.MAX_IMAGE_PIXELS = 1000
    with pytest.raises(ApiError) as info:
        check_image(media.png(50, 50))
    assert info.value.code == "image_too_large"
    assert "2,500" in info.value.message and "1,000" in info.value.message


def test_byte_limit(settings):
    settings.MAX_IMAGE_BYTES = 100
    with pytest.raises(ApiError) as info:
        check_image(media.png(50, 50))
    assert info.value.code == "image_too_large"


def test_base64_and_data_uri_decode_and_urls_are_refused():
    assert decode_base64_image("aGVsbG8=") == b"hello"
    assert decode_base64_image("data:image/png;base64,aGVsbG8=") == b"hello"
    with pytest.raises(ApiError) as info:
        decode_base64_image("http://example.com/a.png")
    assert "not fetched" in info.value.message
    with pytest.raises(ApiError):
        decode_base64_image("data:image/png,rawtext")


def test_oversize_base64_is_refused_before_decoding(settings):
    settings.MAX_IMAGE_BYTES = 1000
    with pytest.raises(ApiError) as info:
        decode_base64_image("A" * 4000)
    assert info.value.code == "image_too_large"


def _pixels(png: bytes) -> tuple:
    with Image.open(io.BytesIO(png)) as stored:
        return stored.mode, stored.size, stored.convert("RGB").tobytes()


def test_a_plain_rgb_png_is_stored_as_sent_and_anything_else_is_written_again(settings):
    """Storing a plain 8-bit RGB PNG that needed no change as sent gives the pixels that writing it
    again would; one with metadata, alpha, a palette, 16 bits, trailing bytes or a size to scale is
    written again. Either way what is stored decodes to the normalised picture."""
    from PIL import PngImagePlugin

    settings.MAX_IMAGE_SIDE = 448
    plain = media.png(64, 48)
    checked = check_image(plain)
    assert checked.normalised_png() == plain
    assert _pixels(plain)[2] == checked.image.tobytes()

    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "somebody")
    rewritten = {
        "text metadata": media.encode(media.image(64, 48), "PNG", pnginfo=text),
        "alpha": media.encode(media.image(64, 48, mode="RGBA"), "PNG"),
        "palette": media.encode(media.image(64, 48).convert("P"), "PNG"),
        "16 bits": media.encode(media.image(64, 48, mode="I;16"), "PNG"),
        "bytes after the end": plain + b"trailing",
        "to scale": media.png(600, 300),
    }
    for name, data in rewritten.items():
        checked = check_image(data)
        stored = checked.normalised_png()
        assert stored != data, name
        assert b"somebody" not in stored, name
        assert _pixels(stored) == ("RGB", checked.image.size, checked.image.tobytes()), name
