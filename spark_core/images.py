"""Question images: checking them, content addresses, the run's image store, and the synthetic visual task.

An image is kept as the bytes it came in (PNG, JPEG, ...), checked once when the data is read
(`check_image`: readable, not zero-size, not huge) and named by the sha256 of those bytes plus its format
(``<hex>.png``): the *reference* that samples, reward items and eval rows carry in their ``images``
column. A run stores each image once under ``runs/{run_id}/images/`` (`spark_core.layout.image_uri`),
however many rollouts, judgment items or evaluation rounds show it.

What a model sees is `model_image`: the image in RGB, scaled down (aspect kept) so that width x height
stays within ``max_pixels`` (1048576 by default, the cap the SPARK reference puts on the images it copies
into judgment and reflection prompts).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import random
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .store import Store

MAX_PIXELS = 1024 * 1024  # what a model is shown at most (the reference's max_pixels)
# An image above this many pixels (or bytes) is a broken export or a decompression bomb, not a figure.
MAX_SOURCE_PIXELS = 50_000_000
MAX_SOURCE_BYTES = 32 * 1024 * 1024
_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


class ImageError(ValueError):
    """An image cannot be used; the message says why (callers add the file and row)."""


def check_image(data: Any) -> bytes:
    """The bytes of a usable image, or ImageError saying what is wrong with it.

    Accepts raw bytes or an HF-datasets style ``{"bytes": ...}`` mapping. The header is read first, so a
    huge image is refused before its pixels are decoded; then the whole image is decoded once."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, dict):
        data = data.get("bytes")
    if data is None:
        raise ImageError("no image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image is {type(data).__name__}, not bytes")
    data = bytes(data)
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > MAX_SOURCE_BYTES:
        raise ImageError(f"image is {len(data):,} bytes (at most {MAX_SOURCE_BYTES:,})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = img.format
            if width == 0 or height == 0:
                raise ImageError(f"image has zero size ({width}x{height})")
            if width * height > MAX_SOURCE_PIXELS:
                raise ImageError(f"image is {width}x{height} pixels (at most {MAX_SOURCE_PIXELS:,} pixels)")
            img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"not a readable image ({type(err).__name__}: {err})") from None
    if fmt not in _FORMATS:
        raise ImageError(f"unsupported image format {fmt!r} (use one of {', '.join(_FORMATS)})")
    return data


def image_ref(data: bytes) -> str:
    """The content address of checked image bytes: ``<sha256 hex>.<format extension>``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        ext = _FORMATS.get(img.format or "", "img")
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


def model_image(data: bytes, max_pixels: int = MAX_PIXELS) -> "PILImage.Image":
    """The image a model is shown: RGB, scaled down (aspect kept) to at most ``max_pixels`` pixels."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    width, height = img.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        img = img.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)
    return img


def data_url(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """A base64 ``data:`` URL of the image as a model is shown it (PNG), for OpenAI-style content parts."""
    buf = io.BytesIO()
    model_image(data, max_pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------ store


def put_images(store: "Store", run_id: str, images: Iterable[bytes]) -> list[str]:
    """Store each image once under the run (content-addressed); their references, in order."""
    from .layout import image_uri

    refs = []
    for data in images:
        ref = image_ref(data)
        uri = image_uri(store.run_uri(run_id), ref)
        if not store.exists(uri):  # same name = same bytes: an existing copy is already right
            store.write_bytes(uri, data)
        refs.append(ref)
    return refs


def get_image(store: "Store", run_id: str, ref: str) -> bytes:
    """The bytes of a stored image; ImageError when the reference names nothing or other bytes."""
    from .layout import image_uri

    uri = image_uri(store.run_uri(run_id), ref)
    if not store.exists(uri):
        raise ImageError(f"image {ref} is not in the store ({uri})")
    data = store.read_bytes(uri)
    if not ref.startswith(hashlib.sha256(data).hexdigest()):
        raise ImageError(f"image {uri} does not match its content address (corrupted store object)")
    return data


class ImageCache:
    """Stored images by reference, read once per process (a question's image serves all its samples)."""

    def __init__(self, store: "Store", run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self._bytes: dict[str, bytes] = {}

    def __call__(self, ref: str) -> bytes:
        if ref not in self._bytes:
            self._bytes[ref] = get_image(self.store, self.run_id, ref)
        return self._bytes[ref]


# ----------------------------------------------------------------------------- synthetic visual task


def render_expression(text: str, seed: str, *, width: int = 112, height: int = 56, font_size: int = 18,
                      noise: int = 0, jitter: int = 4) -> bytes:
    """PNG bytes of ``text`` drawn in black on white with Pillow's bundled font, deterministic per seed.

    Difficulty knobs: ``noise`` grey dots scattered over the image, ``jitter`` pixels of random offset
    of the text, a smaller ``font_size`` or image."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = max(0, (width - (right - left)) // 2 + rng.randint(-jitter, jitter))
    y = max(0, (height - (bottom - top)) // 2 - top + rng.randint(-jitter, jitter))
    draw.text((x, y), text, fill="black", font=font)
    for _ in range(noise):
        px, py = rng.randrange(width), rng.randrange(height)
        shade = rng.randint(80, 200)
        draw.point((px, py), fill=(shade, shade, shade))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # PNG: lossless and byte-stable for the same pixels
    return buf.getvalue()


def row_images(value: Any, base: str | None = None) -> tuple[bytes, ...]:
    """The checked images of one data row's image cell: bytes, ``{"bytes": ..}`` / ``{"path": ..}``
    (the HF ``Image`` feature's stored form), a PIL image (its decoded form, stored as PNG), a path (relative to ``base``, the data file's folder, or any
    fsspec URI), or a list of these. ImageError (naming which image of the row) when one is unusable."""
    if value is None:
        raise ImageError("no image in the image column")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ImageError("the image column holds an empty list")
    out = []
    for k, item in enumerate(items):
        where = f"image {k}: " if len(items) > 1 else ""
        try:
            if isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
                item = item["path"]
            if isinstance(item, str):
                item = _read_path(item, base)
            elif hasattr(item, "save") and hasattr(item, "size"):  # a decoded PIL image (HF datasets rows)
                buf = io.BytesIO()
                item.save(buf, format="PNG")
                item = buf.getvalue()
            out.append(check_image(item))
        except ImageError as err:
            raise ImageError(f"{where}{err}") from None
    return tuple(out)


def _read_path(path: str, base: str | None) -> bytes:
    import fsspec

    full = path if "://" in path or path.startswith("/") or base is None else f"{base.rstrip('/')}/{path}"
    try:
        with fsspec.open(full, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ImageError(f"image file not found: {full}") from None
