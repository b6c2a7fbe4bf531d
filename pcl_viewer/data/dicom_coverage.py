"""Which of pydicom's bundled test images :func:`read_scan` reads: the DICOM coverage table.

``python -m pcl_viewer.data.dicom_coverage`` prints a markdown table (file,
transfer syntax, photometric interpretation, outcome) over every file of
``pydicom.data.get_testdata_files()`` that holds one 2-D frame of image pixel
data (grey or colour). Multi-frame files and files without pixel data are
listed apart (3-D data and non-image objects are out of scope for a radiograph
reader). Nothing is downloaded: pydicom ships these files.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class SampleImage:
    """One pydicom test file holding pixel data, described from its header only."""

    path: Path
    transfer_syntax: str
    photometric: str
    frames: int
    samples: int
    rows: int
    columns: int

    @property
    def single_frame_2d(self) -> bool:
        """One 2-D frame, grey or colour, with Rows/Columns (else it holds no image)."""
        return self.frames <= 1 and self.samples in (1, 3) and self.rows > 0 and self.columns > 0


def _number(ds, tag: str, default: int) -> int:
    try:
        return int(ds.get(tag, default) or default)
    except (TypeError, ValueError):
        return default


def sample_images() -> list[SampleImage]:
    """Every ``pydicom.data.get_testdata_files()`` file with pixel data, sorted by name."""
    import pydicom
    from pydicom.data import get_testdata_files

    out = []
    for name in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(name, force=True, defer_size="1 KB")
        except Exception:  # not a DICOM file (pydicom also ships other test data)
            continue
        if not any(tag in ds for tag in PIXEL_TAGS):
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None

        out.append(SampleImage(
            path=Path(name),
            transfer_syntax=str(getattr(syntax, "name", syntax) or "(none: implicit VR LE)"),
            photometric=str(ds.get("PhotometricInterpretation", "") or "(none)"),
            frames=_number(ds, "NumberOfFrames", 1),
            samples=_number(ds, "SamplesPerPixel", 1),
            rows=_number(ds, "Rows", 0),
            columns=_number(ds, "Columns", 0),
        ))
    return out


def outcome(path: Path, read: Callable | None = None) -> tuple[bool, str]:
    """``(True, "H x W")`` when the file reads, else ``(False, the one-line error reason)``."""
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError

    read = read or read_scan
    try:
        scan = read(path)
    except ScanReadError as exc:
        return False, exc.reason
    except Exception as exc:  # reported as a defect in the table, never hidden
        return False, f"UNCAUGHT {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    h, w = scan.image.shape
    return True, f"{h} x {w}"


def table(images: list[SampleImage] | None = None) -> tuple[str, int, int]:
    """Markdown coverage table of the single-frame 2-D test images -> (text, read, total)."""
    images = [im for im in (images or sample_images()) if im.single_frame_2d]
    lines = ["| file | transfer syntax | photometric | outcome |", "| --- | --- | --- | --- |"]
    ok = 0
    for im in images:
        good, what = outcome(im.path)
        ok += good
        cell = f"read {what}" if good else f"refused: {what}"
        lines.append(f"| {im.path.name} | {im.transfer_syntax} | {im.photometric} | "
                     f"{cell.replace('|', '/')} |")
    return "\n".join(lines), ok, len(images)


def main() -> int:
    text, ok, total = table()
    print(text)
    print(f"\n{ok} of {total} single-frame 2-D test images read.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
