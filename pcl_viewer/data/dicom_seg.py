"""Lung labels as a DICOM Segmentation (SEG) object that references its source image.

:func:`write_dicom_seg` turns ``(H, W)`` uint8 labels (0 background, 1 right lung
= image left in a PA view, 2 left lung) into a binary SEG with two segments,
written by highdicom: SOP Class Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4),
same study as the source, a new series, the source image referenced by its
Study/Series/SOP Instance UIDs, same rows and columns, and the source's
PixelSpacing (a projection radiograph with only ImagerPixelSpacing gets no pixel
measures, as highdicom does for such sources). No Qt here: the napari writer, the
widget's export and ``pcl segment --out x.dcm`` all call this function.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: (segment number = label value, label, SNOMED CT code, code meaning)
LUNG_SEGMENTS = ((1, "Right lung", "3341006", "Right lung"),
                 (2, "Left lung", "44029006", "Left lung"))
# Type 2 attributes of the patient and study modules that highdicom copies from the
# source; empty when the source lacks them (allowed for type 2).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
             "Rows", "Columns")


class DicomSegError(ValueError):
    """Labels or a source image that cannot make a DICOM SEG (the message is one line)."""


def load_source(source: str | os.PathLike | object):
    """The source image's header as a pydicom Dataset (pixel data not read).

    Args:
        source: a DICOM file path or a ``pydicom.Dataset``.
    """
    import pydicom

    if isinstance(source, pydicom.Dataset):
        return source
    p = Path(source)  # type: ignore[arg-type]
    try:
        return pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for a non-DICOM file
        raise DicomSegError(f"{p}: the source image is not a readable DICOM file "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                            ) from None


def _prepared_source(ds):
    """A header-only copy of ``ds`` with the type 2 attributes highdicom reads present."""
    missing = [k for k in _REQUIRED if not ds.get(k)]
    if missing:
        raise DicomSegError(f"the source DICOM has no {', '.join(missing)}; a SEG must "
                            "reference its source image by these")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomSegError(f"the source DICOM has {frames} frames; only single-frame 2-D "
                            "images are supported")
    src = copy.deepcopy(ds)
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in src:
            del src[tag]
    for tag in _TYPE2:
        if tag not in src:
            setattr(src, tag, "")
    return src


def build_dicom_seg(labels: np.ndarray, source, *, series_description: str = "Lung segmentation",
                    algorithm_name: str = "pcl-viewer lung segmentation",
                    algorithm_version: str | None = None, series_number: int = 1001):
    """``(H, W)`` uint8 labels (0/1/2) + source Dataset -> ``highdicom.seg.Segmentation``.

    Raises:
        DicomSegError: labels not 2-D 0/1/2, of another size than the source, or a
            source without the UIDs a SEG references.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    import pcl_viewer

    ds = load_source(source)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise DicomSegError(f"labels must be 2-D (H, W), got shape {lab.shape}")
    if lab.dtype.kind not in "biu" or (lab.size and (lab.min() < 0 or lab.max() > 2)):
        raise DicomSegError("labels must be integers 0 (background), 1 (right lung), 2 (left lung)")
    src = _prepared_source(ds)
    if lab.shape != (int(src.Rows), int(src.Columns)):
        raise DicomSegError(f"labels are {lab.shape[0]} x {lab.shape[1]} but the source image is "
                            f"{int(src.Rows)} x {int(src.Columns)} (rows x columns)")
    version = algorithm_version or pcl_viewer.__version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=Code(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, label, code, meaning in LUNG_SEGMENTS
    ]
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=lab.astype(np.uint8),  # a label map: value k -> segment k
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pcl-viewer",
        manufacturer_model_name="pcl-viewer",
        software_versions=version,
        device_serial_number="none",
        omit_empty_frames=False,  # both segments always present, also when a lung is empty
    )
    seg.SeriesDescription = series_description[:64]
    return seg


def write_dicom_seg(path: str | os.PathLike, labels: np.ndarray,
                    source: str | os.PathLike | object, **kwargs) -> Path:
    """Write ``(H, W)`` uint8 lung labels as a DICOM SEG referencing ``source``. Atomic.

    Args:
        path: output file (``.dcm``).
        labels: ``(H, W)`` integers, 0 background, 1 right lung, 2 left lung; H, W =
            the source's Rows, Columns.
        source: the segmented image: a DICOM path or a pydicom Dataset.
        **kwargs: ``series_description``, ``algorithm_name``, ``algorithm_version``,
            ``series_number`` (see :func:`build_dicom_seg`).

    Returns:
        The written path.

    Raises:
        DicomSegError: (a ValueError) for labels or a source that cannot make a SEG.
    """
    from pcl_viewer.atomic import atomic_save

    seg = build_dicom_seg(labels, source, **kwargs)
    return atomic_save(path, lambda t: seg.save_as(t, enforce_file_format=True))


def read_dicom_seg(path: str | os.PathLike) -> np.ndarray:
    """A lung SEG written by :func:`write_dicom_seg` -> ``(H, W)`` uint8 labels 0/1/2."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid],
                                            combine_segments=True)
    return np.asarray(arr[0], dtype=np.uint8)
