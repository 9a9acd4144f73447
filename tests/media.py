"""Images for tests, built in memory: good ones, and the bad inputs the API must refuse."""

import io
import random
import struct
import zlib

from PIL import Image


def image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noisy image (noise compresses badly, so truncating the file really cuts pixel data)."""
    rng = random.Random(seed)
    bands = len(mode)
    data = bytes(rng.randrange(256) for _ in range(width * height * bands))
    return Image.frombytes(mode, (width, height), data)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(width: int = 64, height: int = 48) -> bytes:
    return encode(image(width, height), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few tens of KB that decode to 400 M pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it: an
    image bomb that only a check of the header (before decoding) stops cheaply."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
