"""Read one CT volume (NIfTI, MetaImage, NRRD or a DICOM series directory) with SimpleITK.

Every failure becomes a `VolumeReadError` whose one-line message names the file and the reason;
SimpleITK's multi-line C++ exceptions are summarised, never passed through. Two failure modes
that SimpleITK does not report are checked here before decoding: a truncated NIfTI file makes
SimpleITK 2.5 crash the process (SIGSEGV) or return uninitialised memory, so the byte count is
verified from the header (and the gzip trailer) first; a DICOM file that GDCM cannot parse is
silently left out of its series, so files that belong to no series are reported as a note.

Notes about what was repaired (dropped duplicate slices, several series, gaps) travel with the
image as metadata under `NOTES_KEY` (`read_notes(image)`), so the pipeline can log them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

SUPPORTED = ".nii.gz .nii .mha .mhd .nrrd .nhdr and DICOM series directories"
NOTES_KEY = "ctprep:notes"

_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_MODALITY = "0008|0060"
_CT_MODALITIES = {"CT", ""}  # missing Modality is accepted: some exporters drop it


class VolumeReadError(Exception):
    """A volume that cannot be read; the message names the file and the reason."""


def read_volume(path: Path) -> sitk.Image:
    """Read a 3D CT volume from a file or from a directory holding a DICOM series.

    DICOM: the directory must hold one series (files of no series are ignored, with a note; several
    series are an error naming their UIDs, since picking one would silently drop a scan);
    slices are sorted along the slice normal, duplicate
    positions are dropped (with a note); rescale slope/intercept are applied by SimpleITK; a
    missing Modality tag is accepted, a non-CT Modality is refused. Pixel values are returned as
    stored (HU or raw scanner units: see `ctprep.hu`).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or directory")
    image = _read_dicom_dir(path) if path.is_dir() else _read_file(path)
    _check_volume_shape(image, path)
    return image


def read_notes(image: sitk.Image) -> list[str]:
    """Notes `read_volume` attached to an image (repairs, ignored files); empty when none."""
    if not image.HasMetaDataKey(NOTES_KEY):
        return []
    return [n for n in image.GetMetaData(NOTES_KEY).split("\n") if n]


def source_fingerprint(path: Path) -> str:
    """A cheap change detector for resume: sizes and mtimes (and names for a DICOM directory).

    Never reads pixels. Two calls give the same string while the source is untouched."""
    path = Path(path)
    try:
        if path.is_dir():
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(path) if e.is_file())
            text = "dir\n" + "\n".join(f"{n}\t{s}\t{m}" for n, s, m in entries)
        else:
            st = path.stat()
            text = f"file\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError as exc:
        raise VolumeReadError(f"{path}: cannot stat ({exc.strerror or exc})") from None
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ files


def _read_file(path: Path) -> sitk.Image:
    import SimpleITK as sitk

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VolumeReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise VolumeReadError(f"{path}: empty file")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(f"{path}: {summarise_sitk_error(exc)}") from None


def _nifti_sizes(header: bytes) -> tuple[int, int] | None:
    """(voxel data offset, voxel data bytes) from a NIfTI-1/2 header; None if it is not one."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1:ndim + 1]):
            return None
        voxels = int(np.prod([int(d) for d in dims[1:ndim + 1]], dtype=np.int64))
        return max(offset, sizeof_hdr + 4), voxels * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI before SimpleITK sees it (it would crash or read garbage)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                header = fh.read(540)
        else:
            with open(path, "rb") as fh:
                header = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({exc})") from None
    sizes = _nifti_sizes(header)
    if sizes is None:
        raise VolumeReadError(f"{path}: not a NIfTI image (bad header)")
    expected = sizes[0] + sizes[1]
    actual = _gzip_size(path, expected) if compressed else path.stat().st_size
    if actual < expected:
        raise VolumeReadError(f"{path}: truncated file ({actual} of {expected} bytes)")


def _gzip_size(path: Path, expected: int) -> int:
    """Uncompressed size of a gzip file; the trailer's ISIZE when it agrees, else a full count.

    ISIZE (last 4 bytes, size mod 2**32) of a single-member gzip equals the expected size; a
    truncated stream ends in arbitrary bytes, so a mismatch triggers an exact streaming count
    (also right for multi-member files such as bgzip output)."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == expected % 2**32:
        return expected
    total = 0
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                while chunk:
                    total += len(inflate.decompress(chunk))
                    chunk = inflate.unused_data                      # next gzip member, if any
                    if chunk:
                        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            except zlib.error:
                return total                                          # corrupt: what decoded so far
    return total


# ------------------------------------------------------------------------------------------ DICOM


def _read_dicom_dir(path: Path) -> sitk.Image:
    import SimpleITK as sitk

    notes: list[str] = []
    files = _choose_series(path, notes)
    reader = sitk.ImageSeriesReader()
    reader.MetaDataDictionaryArrayUpdateOn()
    image = _execute_series(reader, files, path)
    modality = reader.GetMetaData(0, _TAG_MODALITY).strip() if reader.HasMetaDataKey(0, _TAG_MODALITY) else ""
    if modality.upper() not in _CT_MODALITIES:
        raise VolumeReadError(f"{path}: not CT (DICOM Modality is {modality})")
    if not modality:
        notes.append("DICOM Modality tag missing; assumed CT")
    keep = _unique_sorted_slices(reader, len(files), notes)
    if keep is not None:
        reader = sitk.ImageSeriesReader()
        image = _execute_series(reader, [files[i] for i in keep], path)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        notes.append("single-slice DICOM series")
    if notes:
        image.SetMetaData(NOTES_KEY, "\n".join(notes))
    return image


def _choose_series(path: Path, notes: list[str]) -> list[str]:
    """File names of the one DICOM series in `path`, sorted by GDCM along the normal.

    GDCM looks at content, not names, so UID-named slices and stray non-DICOM files are fine."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    try:
        n_files = sum(1 for e in os.scandir(path) if e.is_file())
        # One GDCM scan in the usual case: when the first series holds every file there is no
        # other series, so the (second, equally slow) series-id scan is skipped.
        with _quiet_itk():
            files = list(reader.GetGDCMSeriesFileNames(str(path)))
        if files and len(files) < n_files:
            with _quiet_itk():
                ids = list(reader.GetGDCMSeriesIDs(str(path)))
                series = {sid: list(reader.GetGDCMSeriesFileNames(str(path), sid)) for sid in ids}
            if len(series) > 1:
                shown = ", ".join(f"{sid} ({len(f)} files)" for sid, f in
                                  sorted(series.items(), key=lambda kv: -len(kv[1]))[:4])
                raise VolumeReadError(f"{path}: {len(series)} DICOM series in one directory ({shown}"
                                      f"{', ...' if len(series) > 4 else ''}); put each series in its own "
                                      "directory and give each its own labels row")
            files = next(iter(series.values()), files)
    except (OSError, RuntimeError) as exc:
        raise VolumeReadError(f"{path}: cannot scan for DICOM ({_first_line(exc)})") from None
    if not files:
        raise VolumeReadError(f"{path}: no DICOM series found in the directory (expected {SUPPORTED})")
    if len(files) < n_files:
        notes.append(f"{n_files - len(files)} file(s) in the directory are not part of the series "
                     "(unreadable, truncated or not DICOM)")
    return files


def _execute_series(reader: sitk.ImageSeriesReader, files: list[str], path: Path) -> sitk.Image:
    reader.SetFileNames(files)
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(f"{path}: {summarise_sitk_error(exc)}") from None


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's multi-line console warnings (no series, duplicate or missing slices): we
    detect those cases ourselves and report them as notes or errors."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _unique_sorted_slices(reader: sitk.ImageSeriesReader, count: int, notes: list[str]) -> list[int] | None:
    """Indices of slices to keep, sorted along the normal with duplicate positions dropped.

    None when GDCM's order is already monotonic and unique (the common case: no re-read)."""
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, _TAG_POSITION).split("\\")]
                              for i in range(count)])
        cosines = [float(v) for v in reader.GetMetaData(0, _TAG_ORIENTATION).split("\\")]
    except (RuntimeError, ValueError):
        return None  # no usable positions: keep GDCM's order
    if positions.shape != (count, 3) or len(cosines) != 6:
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    keep = [int(order[0])]
    for i in order[1:]:
        if abs(along[i] - along[keep[-1]]) > 1e-3:
            keep.append(int(i))
    if len(keep) < count:
        notes.append(f"dropped {count - len(keep)} DICOM slice(s) with a duplicate position")
    gaps = np.diff(np.sort(along[keep]))
    if gaps.size > 1 and gaps.max() > 1.5 * np.median(gaps):
        notes.append(f"non-uniform DICOM slice spacing ({gaps.min():.2f}..{gaps.max():.2f} mm): "
                     "missing slices?")
    if keep in (list(range(count)), list(range(count - 1, -1, -1))):
        return None  # monotonic either way: ITK derives the slice direction from first to last
    return keep


# ----------------------------------------------------------------------------------------- checks


def _check_volume_shape(image: sitk.Image, path: Path) -> None:
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component pixels "
                              "(colour or vector image), expected a scalar CT volume")
    if dim == 2:
        raise VolumeReadError(f"{path}: 2D image {image.GetSize()}, expected a 3D volume")
    if dim != 3:
        raise VolumeReadError(f"{path}: {dim}D image {image.GetSize()}, expected a 3D volume")
    if min(image.GetSize()) < 1:
        raise VolumeReadError(f"{path}: empty image {image.GetSize()}")
    if "complex" in image.GetPixelIDTypeAsString():
        raise VolumeReadError(f"{path}: complex pixel type, expected real CT values")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def summarise_sitk_error(exc: BaseException) -> str:
    """The first meaningful line of a SimpleITK/ITK exception, without source paths or addresses."""
    lines = [_strip_itk_prefix(ln.strip()) for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln and not ln.startswith("Exception thrown in SimpleITK")
             and ".cxx:" not in ln and not ln.endswith(".cxx")]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if "Unable to determine ImageIO reader" in line:
        return f"not a readable image (format not recognised; supported: {SUPPORTED})"
    if "does not exist" in line:
        return "no such file"
    if "File cannot be read" in line:
        return "cannot read the image data (truncated or corrupt file?)"
    if line.endswith(":") and len(lines) > 1:       # NRRD and friends put the cause on the last line
        cause = lines[-1].split(": ", 1)[-1] if lines[-1].startswith("[") else lines[-1]
        return f"cannot read the image data ({cause})"
    return line


def _strip_itk_prefix(line: str) -> str:
    for prefix in ("sitk::ERROR:", "itk::ERROR:", "ITK ERROR:"):
        if line.startswith(prefix):
            line = line[len(prefix):].strip()
    head = line.split("(", 1)[0]
    if "): " in line and head.isidentifier():
        line = line.split("): ", 1)[1]              # drop "NiftiImageIO(0x55..): "
    return line
