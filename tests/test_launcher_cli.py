"""``pcl-viewer`` user errors: one line on stderr and a non-zero exit, before any window."""

from __future__ import annotations

import pytest
from pcl_viewer_napari import launcher


@pytest.mark.parametrize(("argv", "message"), [
    (["--sample", "foo"], "pcl-viewer: unknown sample 'foo'; choose one of "),
    (["/nonexistent/scan.png", "--screenshot", "x.png"],
     "pcl-viewer: no such scan: /nonexistent/scan.png"),
])
def test_a_user_error_is_one_line_and_a_non_zero_exit(argv, message, capsys):
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_no_display_is_said_in_one_line(monkeypatch, capsys):
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launcher.sys, "platform", "linux")
    assert launcher.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcl-viewer: no display") and err.count("\n") == 1
