"""Image loading for vision-language training: any common raster format or DICOM, returned as 8-bit RGB.

Medical data mixes ordinary pictures (PNG/JPEG figures, 8-bit radiographs) with 16-bit or float images and DICOM
files whose raw values mean nothing until the modality LUT and the VOI window are applied. :func:`load_image` hides
all of that: whatever the input, the result is a ``PIL.Image.Image`` in ``RGB`` mode, ready for an image processor.
Anything that cannot be read raises :class:`ImageReadError` with a one-line message naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from modaltune.shared.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageReadError(DataError):
    """An image file is missing or cannot be decoded; the message names the file and the reason.

    It is a :class:`~modaltune.shared.errors.DataError` (hence a ``ModaltuneError``), so the CLI prints it as one
    line.
    """


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file into memory as an 8-bit RGB picture.

    Ordinary rasters (PNG, JPEG, BMP, TIFF, ... anything Pillow opens) are converted by mode:

    * ``RGB`` as is (EXIF orientation applied), ``L``/``1``/``P``/``CMYK``/``YCbCr`` converted to RGB;
    * ``LA``/``RGBA``/``PA`` and palette or grey images with a transparent colour are composited onto **black**
      (transparent areas become black, half-transparent ones darker);
    * 16-bit and float modes (``I;16``, ``I``, ``F``) are scaled linearly from the image's own minimum..maximum to
      0..255 (a constant image becomes all zeros; NaNs become 0).

    DICOM files (suffix ``.dcm``/``.dicom``, or any file with the ``DICM`` preamble marker) are read with pydicom:
    for greyscale, the Modality LUT (rescale slope/intercept) is applied, then the VOI window from
    ``WindowCenter``/``WindowWidth`` (first value when several are given; ``VOILUTFunction`` LINEAR, LINEAR_EXACT or
    SIGMOID) or, without a window, the min..max of the frame is mapped to 0..255; ``MONOCHROME1`` is inverted so
    that high values are bright. Multi-frame files give their middle frame. Colour files (RGB, YBR_* converted with
    pydicom's ``convert_color_space``, PALETTE COLOR through its lookup table) are scaled to 8 bits per sample.

    Images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit) are refused; raise that
    limit (or set it to ``None``) for trusted, very large files.

    Args:
        path: Image or DICOM file.

    Returns:
        A new ``RGB`` image, detached from the file (which is closed).

    Raises:
        ImageReadError: The file does not exist or cannot be decoded; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "file not found"
        raise ImageReadError(f"cannot read image {path}: {reason}; fix the path or drop the row")
    try:
        if is_dicom(path):
            return _load_dicom(path)
        return _load_raster(path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types (OSError, ValueError, SyntaxError, struct.error, ...)
        raise ImageReadError(f"cannot read image {path}: {_reason(exc)}; check or replace the file") from exc


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether a file is DICOM: a ``.dcm``/``.dicom`` suffix or the ``DICM`` marker after the 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _reason(exc: BaseException) -> str:
    """An exception's type and message folded onto one line, short enough for a one-line error."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


# ---- ordinary rasters ---------------------------------------------------------------------------------------------


def _load_raster(path: Path) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageReadError(
                f"cannot read image {path}: too many pixels for Pillow's decompression-bomb limit "
                f"(PIL.Image.MAX_IMAGE_PIXELS = {limit}; {_reason(exc)}); raise that limit if the file is trusted"
            ) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to a new RGB image (see :func:`load_image` for the rules)."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_minmax_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")  # a copy even for RGB input


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale the finite values of ``arr`` linearly from their min..max to 0..255 (constant or empty -> 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---- DICOM --------------------------------------------------------------------------------------------------------


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, as_pixel_options, get_decoder
        from pydicom.pixels import convert_color_space
    except ImportError:
        raise ImageReadError(
            f"cannot read DICOM {path}: needs pydicom>=3.0 (installed {pydicom.__version__}); "
            "run pip install -U pydicom"
        ) from None

    ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"cannot read DICOM {path}: it has no pixel data (not an image object)")
    ds.ensure_file_meta()
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (forced read): use the encoding it was read with
        implicit, little = ds.original_encoding
        if implicit is not False:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frames // 2 if frames > 1 else None
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        arr, props = get_decoder(syntax).as_array(ds, index=index, raw=True, **as_pixel_options(ds))
    except Exception as exc:
        hint = "; compressed DICOM may need pylibjpeg[all] or python-gdcm" if syntax.is_compressed else ""
        raise ImageReadError(f"cannot decode DICOM {path} ({syntax.name}): {_reason(exc)}{hint}") from exc
    photometric = str(props.get("photometric_interpretation", ds.get("PhotometricInterpretation", "MONOCHROME2")))
    bits = int(props.get("bits_stored", ds.get("BitsStored", 8)) or 8)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        return Image.fromarray(_scale_bits(rgb, int(descriptor[2]) if descriptor else 8), "RGB")
    if arr.ndim == 3:  # (rows, columns, samples)
        if photometric.startswith("YBR_FULL"):  # decoded raw; 4:2:2 subsampling is already undone
            arr = convert_color_space(arr, photometric, "RGB")
        elif photometric not in ("RGB", "YBR_ICT", "YBR_RCT"):  # JPEG 2000 decoders undo ICT/RCT themselves
            raise ImageReadError(f"cannot read DICOM {path}: unsupported colour photometric {photometric!r}")
        return Image.fromarray(_scale_bits(arr[..., :3], bits), "RGB")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"cannot read DICOM {path}: unsupported photometric interpretation {photometric!r}")

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    window = _first_window(ds)
    if window:
        grey = _window_to_uint8(values, *window, function=str(ds.get("VOILUTFunction") or "LINEAR").strip().upper())
    else:
        grey = _minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L").convert("RGB")


def _first_window(ds) -> tuple[float, float] | None:
    """The first ``(WindowCenter, WindowWidth)`` pair of a dataset, or None when absent or unusable."""
    from pydicom.multival import MultiValue

    pair = []
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0] if len(value) else None
        try:
            pair.append(float(value))
        except (TypeError, ValueError):
            return None
    center, width = pair
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None
    return center, width


def _window_to_uint8(values: np.ndarray, center: float, width: float, *, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2) mapping modality values to 0..255."""
    if function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    elif function == "LINEAR_EXACT":
        out = ((values - center) / width + 0.5) * 255.0
    elif width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        out = np.where(values <= center - 0.5, 0.0, 255.0)
    else:  # LINEAR (the default)
        out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scale_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned colour samples of the given bit depth to 8 bits."""
    if arr.dtype == np.uint8 or bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    top = float(2**bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
