"""Image loading for vision-language training: any common raster format or DICOM, returned as 8-bit RGB.

Medical data mixes ordinary pictures (PNG/JPEG figures, 8-bit radiographs) with 16-bit or float images and DICOM
files whose raw values mean nothing until the modality LUT and the VOI window are applied. :func:`load_image` hides
all of that: whatever the input, the result is a ``PIL.Image.Image`` in ``RGB`` mode, ready for an image processor.
Anything that cannot be read raises :class:`ImageReadError` with a one-line message naming the file.
"""

from __future__ import annotations

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

    Attributes:
        reason: What a data loader counts the skipped file under: ``"unreadable image"``, or a more exact cause
            (``"non-finite samples"``).
    """

    def __init__(self, message: str, reason: str = "unreadable image") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason when a DataLoader worker sends the error back
        return type(self), (str(self), self.reason)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file into memory as an 8-bit RGB picture.

    Ordinary rasters (PNG, JPEG, BMP, TIFF, ... anything Pillow opens) are converted by mode:

    * ``RGB`` as is (EXIF orientation applied), ``L``/``1``/``P``/``CMYK``/``YCbCr`` converted to RGB;
    * ``LA``/``RGBA``/``PA`` and palette or grey images with a transparent colour are composited onto **black**
      (transparent areas become black, half-transparent ones darker);
    * 16-bit and float modes (``I;16``, ``I``, ``F``) are scaled linearly from the image's own minimum..maximum to
      0..255 (a constant image becomes all zeros).

    A float image (or DICOM) holding NaN or infinity is refused (reason ``"non-finite samples"``): there is no
    honest 8-bit picture of it.

    DICOM files (suffix ``.dcm``/``.dicom``, or any file with the ``DICM`` preamble marker) are read with pydicom:
    for greyscale, pydicom applies the Modality LUT (rescale slope/intercept) and then the first VOI transform (a VOI
    LUT Sequence, else ``WindowCenter``/``WindowWidth`` with its ``VOILUTFunction``: LINEAR, LINEAR_EXACT or
    SIGMOID), whose output range is mapped to 0..255; without a VOI transform the min..max of the frame is mapped
    to 0..255; ``MONOCHROME1`` is inverted so
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
                if im.mode == "F":
                    _check_finite(np.asarray(im), path)
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


def _check_finite(arr: np.ndarray, path: Path) -> None:
    """Refuse an image with NaN or infinite samples: min-max scaling would turn it into a plausible-looking but
    wrong picture."""
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ImageReadError(f"cannot read image {path}: non-finite samples ({bad} NaN or infinite of "
                             f"{np.size(arr)}); fix or drop the file", reason="non-finite samples")


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
    _check_finite(values, path)
    grey = _voi_to_uint8(values, ds)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L").convert("RGB")


def _voi_to_uint8(values: np.ndarray, ds) -> np.ndarray:
    """Modality values to 0..255 through the dataset's first VOI transform, applied by pydicom (a VOI LUT Sequence,
    else the Window Center/Width with its VOI LUT Function, PS3.3 C.11.2); the transform's output range is then
    mapped onto 8 bits. Without a usable VOI transform the frame's min..max is used."""
    from pydicom.pixels import apply_voi_lut

    lut = (ds.get("VOILUTSequence") or [None])[0]
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if lut is None and not has_window:
        return _minmax_to_uint8(values)
    try:
        out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):  # an unusable window: show the data range
        return _minmax_to_uint8(values)
    if lut is not None and "LUTDescriptor" in lut:
        low, high = 0.0, float(2 ** int(lut.LUTDescriptor[2]) - 1)
    else:  # the range apply_windowing maps onto (PS3.3 C.11.2.1.2): the modality output's nominal range
        low, high = _modality_range(ds)
    if high <= low:
        return _minmax_to_uint8(values)
    return np.clip(np.rint((out - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def _modality_range(ds) -> tuple[float, float]:
    """The nominal range of modality values that pydicom's windowing maps its output onto."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", 16) or 16)
    low, high = (0.0, 2.0**bits - 1) if int(ds.get("PixelRepresentation", 0) or 0) == 0 else (
        -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _scale_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned colour samples of the given bit depth to 8 bits."""
    if arr.dtype == np.uint8 or bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    top = float(2**bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
