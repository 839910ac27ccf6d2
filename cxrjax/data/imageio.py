"""Image decode / resize / encode shared by the TFDS builders and the Grain transforms.

One place defines how a file becomes the stored uint8 grayscale image, so every dataset is
prepared the same way: decode -> grayscale -> center crop to a square -> antialiased resize.
`decode` also returns a one-line description of what it decided for the file (bit depth and
why, window, inversion, colour rule); the builders store it per record and count it in the
dataset metadata.

Mapping to 8 bits (documented rules; the record keeps 256 levels, which is what the stored
PNGs and the pipeline carry, so a float path is not kept):

* 8-bit gray: as stored. RGB / RGBA / palette: ITU-R 601-2 luma
  (L = 0.299 R + 0.587 G + 0.114 B, PIL's "L" conversion); alpha is ignored.
* 16-bit PNG / TIFF (and 32-bit integer): divided by the declared bit depth's maximum
  (2**bits - 1). Declared = the PNG sBIT chunk: with sBIT = b and every value < 2**b the data
  are unshifted b-bit values; otherwise they are shifted to 16 bits as the PNG specification
  asks and 65535 is used. Without sBIT the depth is inferred from the file's maximum:
  <= 255 -> 8 bits, <= 4095 -> 12 bits (the usual CR/DX detector depth), else 16 bits. Never
  min-max: the same gray means the same thing in every file of a dataset.
* 32-bit float TIFF: values in [0, 1] as they are, otherwise min-max to [0, 1].
* DICOM (pydicom; compressed transfer syntaxes need the `dicom` extra's pixel handlers):
  first frame; modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence); then the
  VOI: the first VOI LUT Sequence item, else the first Window Center / Width (VOI LUT
  Function LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2), mapped to [0, 1]; with
  neither, the declared range [0, 2**BitsStored - 1] (signed when Pixel Representation is 1)
  passed through the modality LUT. MONOCHROME1 (bright = low attenuation) is inverted so that
  bone is bright in every stored image. RGB DICOMs use the luma rule.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_EXTRA = "pip install 'cxrjax[dicom]'"


class CorruptImageError(ValueError):
    """An image that cannot be decoded; the message names its file or record."""


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM Part 10 files: 'DICM' after the 128-byte preamble, or a .dcm/.dicom name."""
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_EXTENSIONS)


def decode_gray(data: bytes | np.ndarray, name: str = "<bytes>") -> np.ndarray:
    """Decodes an image file's bytes (or passes through an array) to uint8 [H, W] grayscale.

    Raises CorruptImageError naming `name` when the bytes are not a complete image.
    """
    return decode(data, name)[0]


def decode(data: bytes | np.ndarray, name: str = "<bytes>") -> tuple[np.ndarray, str]:
    """(uint8 [H, W] grayscale, what was decided) for PNG/JPEG/TIFF/DICOM bytes or an array."""
    if isinstance(data, np.ndarray):
        array = data[..., 0] if data.ndim == 3 else data
        if array.dtype != np.uint8:
            raise CorruptImageError(f"{name}: expected uint8 pixels, got {array.dtype}")
        return array, "8-bit array"
    if is_dicom(data, name):
        return _decode_dicom(data, name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Forces a full decode: truncated files fail here, not later.
            kind = image.format or "image"
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                bits, rule = high_bit_depth(array, png_sbit(data) if kind == "PNG" else None)
                decision = f"{kind} {image.mode}: {bits}-bit ({rule})"
                return to_uint8(array / (2**bits - 1)), decision
            if image.mode == "F":
                array = np.asarray(image, dtype=np.float64)
                low, high = float(array.min()), float(array.max())
                if low >= 0.0 and high <= 1.0:
                    return to_uint8(array), f"{kind} float: [0, 1] as stored"
                return to_uint8((array - low) / max(high - low, 1e-12)), f"{kind} float: min-max"
            if image.mode in ("L", "1"):
                return np.asarray(image.convert("L"), dtype=np.uint8), f"{kind} 8-bit gray"
            return np.asarray(image.convert("L"), dtype=np.uint8), f"{kind} {image.mode}: luma"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{name}: not a readable image ({error})") from error


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded and clipped."""
    return np.clip(np.rint(np.asarray(unit, np.float64) * 255.0), 0, 255).astype(np.uint8)


def high_bit_depth(array: np.ndarray, sbit: int | None) -> tuple[int, str]:
    """(bits, why) for a 16-bit (or wider) integer image: the module docstring's rule."""
    peak = float(array.max()) if array.size else 0.0
    if sbit:
        if peak < 2**sbit:
            return sbit, f"sBIT {sbit}, values unshifted"
        return 16, f"sBIT {sbit}, values shifted to 16 bits"
    if peak <= 255:
        return 8, "no sBIT, max <= 255"
    if peak <= 4095:
        return 12, "no sBIT, max <= 4095"
    return 16, "no sBIT"


def png_sbit(data: bytes) -> int | None:
    """Significant bits of a grayscale PNG's sBIT chunk (first byte; max over channels), or None.

    Walks the chunk headers up to the first IDAT (sBIT must precede it); PIL does not expose it.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"sBIT":
            chunk = data[offset + 8 : offset + 8 + length]
            return max(chunk) if chunk else None
        if kind in (b"IDAT", b"IEND"):
            return None
        offset += 12 + length
    return None


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Crops the central square of an [H, W] image (the shorter side is kept whole)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops to a square, then resizes to [size, size] with an antialiased filter.

    PIL's BICUBIC with reducing_gap=None is a properly antialiased (support-scaled) filter when
    shrinking, deterministic across platforms; upsampling uses the same filter.
    """
    square = center_crop_square(image)
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def fit_square(image: np.ndarray, size: int, content: int = 0) -> np.ndarray:
    """[size, size]: resized (`content` 0), or resized to `content` px and reflect-padded.

    The padded form puts a film on a larger canvas without resampling it (a PGGAN's power-of-
    two canvas around 28 px films): resampling 28 -> 32 -> 28 px keeps only ~78 % of a film's
    fine detail (mean absolute Laplacian), which a generator then cannot learn.
    """
    if not content or content == size:
        return resize_square(image, size)
    if not 0 < content < size:
        raise ValueError(f"content {content} px must lie in (0, {size}) to pad to {size} px")
    film = resize_square(image, content)
    before = (size - content) // 2
    after = size - content - before
    return np.pad(film, ((before, after), (before, after)), mode="reflect")


def crop_content(images, content: int, axes: tuple[int, int] = (-2, -1)):
    """The central `content` px of square canvases along `axes` (numpy or jax arrays): the
    inverse of `fit_square`'s padding."""
    size = images.shape[axes[0]]
    if not 0 < content <= size:
        raise ValueError(f"content {content} px must lie in (0, {size}] to crop {size} px")
    top = (size - content) // 2
    index = [slice(None)] * images.ndim
    for axis in axes:
        index[axis] = slice(top, top + content)
    return images[tuple(index)]


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 [H, W] or [H, W, 1] image as grayscale PNG bytes (lossless)."""
    if image.ndim == 3:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_dicom(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """DICOM bytes -> (uint8 [H, W], decision); the module docstring gives the rule."""
    try:
        import pydicom
        from pydicom import pixels as dicom_pixels
    except ImportError as error:  # A core dependency; only a broken install lands here.
        raise CorruptImageError(f"{name}: reading DICOM needs pydicom ({DICOM_EXTRA})") from error
    ds = None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        array = ds.pixel_array
    except Exception as error:  # noqa: BLE001 -- pydicom raises many kinds for bad files.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = f"; compressed transfer syntax {syntax.name}: {DICOM_EXTRA} adds its decoders"
        raise CorruptImageError(
            f"{name}: not a readable DICOM image ({type(error).__name__}: {error}{hint})"
        ) from error
    notes = []
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        array = array[0]
        notes.append(f"frame 1 of {frames}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            if photometric.startswith("YBR"):
                array = dicom_pixels.convert_color_space(array, photometric, "RGB")
            rgb = np.asarray(array[..., :3], np.float64)
            peak = 2 ** int(ds.get("BitsStored", 8)) - 1
            unit = rgb @ np.array([0.299, 0.587, 0.114]) / peak
            return to_uint8(unit), f"DICOM {photometric}: luma" + _join(notes)
        raise CorruptImageError(f"{name}: unsupported DICOM photometric {photometric!r}")
    if array.ndim != 2:
        raise CorruptImageError(f"{name}: DICOM pixel data of shape {array.shape} is not 2-D")
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    notes.append(f"{photometric}, BitsStored {bits}{' signed' if signed else ''}")
    values = np.asarray(dicom_pixels.apply_modality_lut(array, ds), np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0))
    if "ModalityLUTSequence" in ds:
        notes.append("modality LUT")
    elif (slope, intercept) != (1.0, 0.0):
        notes.append(f"rescale {slope:g}x{intercept:+g}")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # LUT inputs are integers (stored values through the modality LUT).
        voi = dicom_pixels.apply_voi(np.rint(values).astype(np.int64), ds, index=0)
        voi = np.asarray(voi, np.float64)
        unit = voi / (2**lut_bits - 1)
        notes.append(f"VOI LUT ({lut_bits}-bit)")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
        if width < 1 or function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise CorruptImageError(f"{name}: unusable window {center}/{width} {function}")
        unit = window(values, center, width, function)
        notes.append(f"window {center:g}/{width:g} {function}")
    else:
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ends = np.asarray(dicom_pixels.apply_modality_lut(np.array([low, high]), ds), np.float64)
        low, high = float(ends.min()), float(ends.max())
        unit = (values - low) / max(high - low, 1e-12)
        notes.append("no window: declared range")
    if photometric == "MONOCHROME1":
        unit = 1.0 - np.clip(unit, 0.0, 1.0)
        notes.append("inverted")
    return to_uint8(unit), "DICOM " + ", ".join(notes)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window to [0, 1] (DICOM PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)."""
    values = np.asarray(values, np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear in between.
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM number (several windows: the first)."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _join(notes: list[str]) -> str:
    return (", " + ", ".join(notes)) if notes else ""
