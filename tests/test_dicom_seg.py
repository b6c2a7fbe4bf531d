"""DICOM SEG export of lung labels: round trip through highdicom and pydicom, references kept."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from data_factory import pydicom_file, synthetic_cxr, write_dicom
from pydicom.uid import generate_uid

from pcl_viewer.data.dicom_seg import (
    SEG_SOP_CLASS,
    DicomSegError,
    read_dicom_seg,
    write_dicom_seg,
)


def _labels(h: int, w: int) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    lab[h // 5: 4 * h // 5, w // 8: 3 * w // 8] = 1  # right lung = image left
    lab[h // 5: 4 * h // 5, 5 * w // 8: 7 * w // 8] = 2
    return lab


def _dx_source(tmp_path):
    """A DX-like file: ImagerPixelSpacing only, UIDs set, no patient/study type-2 tags."""
    path = write_dicom(tmp_path / "dx.dcm", (synthetic_cxr(60, 50) * 4095).astype(np.uint16),
                       spacing=None)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.save_as(path)
    return path


def test_round_trip_references_and_geometry_of_a_real_ct_file(tmp_path):
    src_path = pydicom_file("CT_small.dcm")
    src = pydicom.dcmread(src_path)
    lab = _labels(128, 128)
    out = write_dicom_seg(tmp_path / "lungs.dcm", lab, src_path)
    np.testing.assert_array_equal(read_dicom_seg(out), lab)

    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == SEG_SOP_CLASS == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.file_meta.MediaStorageSOPClassUID == SEG_SOP_CLASS
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([float(v) for v in src.PixelSpacing])
    segs = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segs) == [1, 2]
    assert segs[1].SegmentLabel == "Right lung" and segs[2].SegmentLabel == "Left lung"
    assert segs[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "3341006"
    assert segs[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    # pydicom alone: one binary frame per segment, each equal to its lung
    frames = seg.pixel_array
    assert frames.shape == (2, 128, 128)
    np.testing.assert_array_equal(frames[0], lab == 1)
    np.testing.assert_array_equal(frames[1], lab == 2)
    assert [p.name for p in tmp_path.iterdir()] == ["lungs.dcm"]  # no temp file left


def test_projection_radiograph_source_and_empty_lung(tmp_path):
    src = _dx_source(tmp_path)
    lab = _labels(60, 50)
    lab[lab == 2] = 0  # left lung not found: the segment is still written, empty
    out = write_dicom_seg(tmp_path / "seg.dcm", lab, pydicom.dcmread(src))
    np.testing.assert_array_equal(read_dicom_seg(out), lab)
    seg = pydicom.dcmread(out)
    assert len(seg.SegmentSequence) == 2
    assert seg.StudyInstanceUID == pydicom.dcmread(src).StudyInstanceUID


def test_refusals_are_one_line(tmp_path):
    src = _dx_source(tmp_path)
    cases = [
        (np.zeros((10, 10), np.uint8), "labels are 10 x 10 but the source image is 60 x 50"),
        (np.full((60, 50), 3, np.uint8), "labels must be integers 0"),
        (np.zeros((60, 50, 2), np.uint8), "must be 2-D"),
    ]
    for lab, expect in cases:
        with pytest.raises(DicomSegError, match=expect) as info:
            write_dicom_seg(tmp_path / "x.dcm", lab, src)
        assert "\n" not in str(info.value)
    no_study = write_dicom(tmp_path / "nostudy.dcm", np.zeros((60, 50), np.uint16))
    with pytest.raises(DicomSegError, match="no StudyInstanceUID"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros((60, 50), np.uint8), no_study)
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(DicomSegError, match="not a readable DICOM"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros((60, 50), np.uint8), png)
    assert not (tmp_path / "x.dcm").exists()
