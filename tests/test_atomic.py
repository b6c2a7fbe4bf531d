"""pcl_viewer.atomic: concurrent writers of one file, readers never see half a file, cleanup."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from pcl_viewer import atomic


def test_concurrent_writers_never_collide_and_readers_see_whole_files(tmp_path):
    target = tmp_path / "report.csv"
    texts = [f"writer {k}\n" + ("x" * 199 + "\n") * 500 for k in range(4)]
    atomic.atomic_write_text(target, texts[0])
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def write(k: int) -> None:
        try:
            for _ in range(25):
                atomic.atomic_write_text(target, texts[k])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def read() -> None:
        while not stop.is_set():
            text = target.read_text()
            if text not in texts:
                errors.append(AssertionError(f"a reader saw {len(text)} characters"))
                return
            seen.add(texts.index(text))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert errors == []
    assert target.read_text() in texts and seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic.atomic_write_text(target, "old")
    with pytest.raises(OSError) as err, atomic.atomic_writer(target) as fh:
        fh.write("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    assert atomic.disk_full(err.value)
    assert "disk full while writing" in atomic.one_line_os_error(err.value)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_dir_replaces_a_folder_or_leaves_it_untouched(tmp_path):
    target = tmp_path / "ckpt"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("killed halfway")
    assert (target / "f").read_text() == "1"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("3")
    assert (target / "f").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bytes_writer_round_trips(tmp_path):
    path = atomic.atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff" * 10)
    assert Path(path).read_bytes() == b"\x00\xff" * 10


def test_atomic_path_keeps_the_extension_for_writers_that_choose_a_format_by_name(tmp_path):
    target = tmp_path / "labels.nii.gz"
    with atomic.atomic_path(target, keep_suffix=True) as tmp:
        seen = tmp.name
        tmp.write_bytes(b"img")
    assert seen.endswith(".tmp.nii.gz")
    assert target.read_bytes() == b"img"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]
