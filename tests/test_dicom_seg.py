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


@pytest.fixture(scope="module")
def ct_seg(tmp_path_factory):
    """A SEG of two synthetic lungs written against pydicom's CT_small.dcm:
    ``(labels, source dataset, SEG path, SEG dataset)``."""
    folder = tmp_path_factory.mktemp("seg")
    src_path = pydicom_file("CT_small.dcm")
    lab = _labels(128, 128)
    out = write_dicom_seg(folder / "lungs.dcm", lab, src_path)
    return lab, pydicom.dcmread(src_path), out, pydicom.dcmread(out)


def test_a_seg_reads_back_as_the_written_labels(ct_seg):
    lab, _, out, _ = ct_seg
    np.testing.assert_array_equal(read_dicom_seg(out), lab)


def test_a_seg_is_a_segmentation_storage_object(ct_seg):
    seg = ct_seg[3]
    assert seg.SOPClassUID == SEG_SOP_CLASS == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.file_meta.MediaStorageSOPClassUID == SEG_SOP_CLASS


def test_a_seg_is_a_new_series_of_the_source_study(ct_seg):
    _, src, _, seg = ct_seg
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID


def test_a_seg_references_its_source_series_and_instance(ct_seg):
    _, src, _, seg = ct_seg
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_a_seg_has_the_sources_size_and_pixel_spacing(ct_seg):
    _, src, _, seg = ct_seg
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([float(v) for v in src.PixelSpacing])


def test_a_seg_names_and_codes_both_lungs(ct_seg):
    segs = {int(s.SegmentNumber): s for s in ct_seg[3].SegmentSequence}
    assert {n: s.SegmentLabel for n, s in segs.items()} == {1: "Right lung", 2: "Left lung"}
    assert {n: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for n, s in segs.items()} == {
        1: "3341006", 2: "44029006"}


def test_pydicom_alone_reads_one_binary_frame_per_lung(ct_seg):
    lab, _, _, seg = ct_seg
    frames = seg.pixel_array
    assert frames.shape == (2, 128, 128)
    np.testing.assert_array_equal(frames[0], lab == 1)
    np.testing.assert_array_equal(frames[1], lab == 2)


def test_writing_a_seg_leaves_no_temporary_file(ct_seg):
    out = ct_seg[2]
    assert [p.name for p in out.parent.iterdir()] == ["lungs.dcm"]


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
