"""A sample picture to ask about (a house under the sun), for the quickstart and the benchmarks."""

import io

from PIL import Image, ImageDraw


def sample_image() -> Image.Image:
    image = Image.new("RGB", (320, 240), (135, 206, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 180, 320, 240), fill=(60, 160, 60))
    draw.ellipse((240, 20, 300, 80), fill=(255, 215, 0))
    draw.rectangle((90, 110, 190, 190), fill=(180, 70, 50))
    draw.polygon([(80, 110), (140, 60), (200, 110)], fill=(120, 40, 30))
    draw.rectangle((125, 150, 150, 190), fill=(90, 50, 20))
    return image


def sample_png() -> bytes:
    buffer = io.BytesIO()
    sample_image().save(buffer, format="PNG")
    return buffer.getvalue()
