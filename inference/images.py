"""Image checks: everything an image must pass before any inference is spent on it.

The order matters: size of the bytes, type by content (magic numbers, never the file name), the
decoded size read from the header *before* decoding (decompression bombs), then the decode itself
(truncated files), EXIF orientation, RGB, and the scale-down to ``MAX_IMAGE_SIDE``.
"""

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from django.conf import settings
from PIL import Image, ImageOps, UnidentifiedImageError

from config.errors import ApiError

# (format PIL knows it by, MIME type, test on the first bytes)
_SIGNATURES = (
    ("JPEG", "image/jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("PNG", "image/png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("WEBP", "image/webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("GIF", "image/gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("BMP", "image/bmp", lambda b: b[:2] == b"BM"),
)
SUPPORTED = "JPEG, PNG, WebP, GIF or BMP"
_DATA_URI_RE = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed every check, ready for the model."""

    image: Image.Image  # RGB, EXIF orientation applied, longer side <= MAX_IMAGE_SIDE
    sha256: str  # of the original bytes
    format: str  # JPEG, PNG, WEBP, GIF or BMP
    width: int  # of the original
    height: int
    size_bytes: int  # of the original
    as_sent: bytes | None = None  # the original, when it is already the PNG to store (_store_as_sent)

    def normalised_png(self) -> bytes:
        """The picture as stored and handed to the worker: PNG, lossless. zlib level 1, not PNG's
        default 6: for a photo scaled to 448 px that is ~6x faster to write (on the request path,
        measured by bench/profile_path.py --image photo) for ~15% more bytes; the pixels are the same.
        A plain RGB PNG that needed no change is stored as sent: writing it again would give the
        same pixels (0.8 ms for a 320x240 drawing here)."""
        if self.as_sent is not None:
            return self.as_sent
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", optimize=False, compress_level=1)
        return buffer.getvalue()


def _limit_text() -> str:
    return f"{settings.MAX_IMAGE_BYTES / (1024 * 1024):g} MB"


def sniff_format(data: bytes) -> str | None:
    for name, _mime, test in _SIGNATURES:
        if test(data):
            return name
    return None


def check_image(data: bytes, *, param: str = "image") -> CheckedImage:
    """Validate and normalise image bytes, or raise ``ApiError`` saying what to fix. ``param`` names
    the image in the error (``image``, ``image[1]``, ``messages[0].content[2]``): a request may
    carry several."""
    the_image = "The image" if param == "image" else f"The image at '{param}'"
    if not data:
        raise ApiError("invalid_image", f"{the_image} is empty.", param=param)
    if len(data) > settings.MAX_IMAGE_BYTES:
        raise ApiError(
            "image_too_large",
            f"{the_image} is {len(data) / (1024 * 1024):.1f} MB; the limit is {_limit_text()}.",
            param=param,
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            "invalid_image",
            f"{the_image.replace('image', 'file', 1)} is not an image of a supported type ({SUPPORTED}); "
            "the type is read from the content.",
            param=param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size  # read from the header; nothing decoded yet
            if width <= 0 or height <= 0:
                raise ApiError("invalid_image", f"{the_image} has no pixels.", param=param)
            if width * height > settings.MAX_IMAGE_PIXELS:
                raise ApiError(
                    "image_too_large",
                    f"{the_image} is {width}x{height} pixels ({width * height:,}); the limit is "
                    f"{settings.MAX_IMAGE_PIXELS:,} pixels. Scale it down before sending.",
                    param=param,
                )
            if fmt == "GIF":
                image.seek(0)  # first frame only
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard can fire while the header is read, before our check above; its message
        # carries the image's pixel count ("Image size (N pixels) exceeds ..."): quote it with our limit.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else f"more than {settings.MAX_IMAGE_PIXELS:,} pixels"
        raise ApiError(
            "image_too_large",
            f"{the_image} is {size}; the limit is {settings.MAX_IMAGE_PIXELS:,} pixels. Scale it down before sending.",
            param=param,
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(
            "invalid_image",
            f"{the_image} ({fmt}) could not be decoded (truncated or corrupt file): {exc}",
            param=param,
        ) from exc
    as_sent = data if fmt == "PNG" and max(width, height) <= settings.MAX_IMAGE_SIDE and _store_as_sent(data) else None
    image = normalise(image)
    return CheckedImage(
        image=image,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=width,
        height=height,
        size_bytes=len(data),
        as_sent=as_sent,
    )


# Chunks that carry no metadata about the picture's origin (colour space, pixel density): a PNG
# with any other (text, EXIF, time, ICC profile, transparency, private chunks) is written again.
_PLAIN_PNG_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"sRGB", b"gAMA", b"cHRM", b"pHYs", b"sBIT"}


def _store_as_sent(data: bytes) -> bool:
    """True for a PNG that normalising would only write again with the same pixels: 8-bit RGB (no
    alpha, no palette, so nothing to convert or flatten), no orientation or other metadata, nothing
    after its end. The caller checked its size and that it decodes."""
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] != 8 or data[25] != 2:  # bit depth, colour type
        return False
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind not in _PLAIN_PNG_CHUNKS:
            return False
        position += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return position == len(data)
    return False


def normalise(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, RGB (transparency flattened on white), longer side <= MAX_IMAGE_SIDE."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    elif image.mode != "RGB":
        image = image.convert("RGB")
    side = settings.MAX_IMAGE_SIDE
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def decode_base64_image(text: str, param: str = "image") -> bytes:
    """Bytes of an image sent as base64 or as a ``data:`` URI. Remote URLs are refused (no server-side fetch)."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError("invalid_image", f"'{param}' must be a base64 string or a data URI.", param=param)
    text = text.strip()
    if text.lower().startswith(("http://", "https://")):
        raise ApiError(
            "invalid_image",
            "Remote image URLs are not fetched by this server; send the image as base64 or a data URI "
            "(data:image/png;base64,...).",
            param=param,
        )
    match = _DATA_URI_RE.match(text)
    if match:
        if not match.group("b64"):
            raise ApiError("invalid_image", "Data URIs must be base64-encoded (';base64,').", param=param)
        text = text[match.end() :]
    # Refuse oversize payloads before decoding them: base64 is 4 characters per 3 bytes.
    if len(text) * 3 // 4 > settings.MAX_IMAGE_BYTES + 3:
        raise ApiError(
            "image_too_large",
            f"The image is about {len(text) * 3 / 4 / (1024 * 1024):.1f} MB; the limit is {_limit_text()}.",
            param=param,
        )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("invalid_image", f"'{param}' is not valid base64: {exc}", param=param) from exc


def fetch_image_url(url: str, param: str = "image_url") -> bytes:
    """Fetch a remote image, only from hosts listed in IMAGE_URL_ALLOWED_HOSTS (none by default)."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    allowed = {h.lower() for h in settings.IMAGE_URL_ALLOWED_HOSTS}
    if host not in allowed:
        raise ApiError(
            "invalid_image",
            f"Remote image URLs are not fetched from '{host}'; send the image as a data URI "
            "(data:image/png;base64,...).",
            param=param,
        )
    limit = settings.MAX_IMAGE_BYTES
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "sightline"}), timeout=10) as r:
            data = r.read(limit + 1)
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        raise ApiError("invalid_image", f"The image at {url} could not be fetched: {exc}", param=param) from exc
    if len(data) > limit:
        raise ApiError("image_too_large", f"The image at {url} is larger than {_limit_text()}.", param=param)
    return data
