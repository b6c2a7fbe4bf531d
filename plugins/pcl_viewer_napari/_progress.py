"""A progress bar that never repaints synchronously.

``QProgressBar.setValue`` calls ``repaint()`` whenever its text or filled width
changes; in a window with napari's OpenGL canvas that composites the whole
window at once (software GL: hundreds of ms). This bar only schedules an
``update()``, which Qt coalesces with the next regular paint.
"""

from __future__ import annotations

from qtpy.QtCore import QRectF, Qt
from qtpy.QtGui import QColor, QPainter
from qtpy.QtWidgets import QSizePolicy, QWidget


class ProgressBar(QWidget):
    def __init__(self, parent: QWidget | None = None, maximum: int = 1000) -> None:
        super().__init__(parent)
        self._value, self._maximum = 0, maximum
        self.setMinimumHeight(18)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def setRange(self, minimum: int, maximum: int) -> None:  # noqa: N802 (Qt naming)
        self._maximum = max(maximum - minimum, 1)
        self.update()

    def setValue(self, value: int) -> None:  # noqa: N802
        value = max(0, min(int(value), self._maximum))
        if value != self._value:
            self._value = value
            self.update()

    def value(self) -> int:
        return self._value

    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        r = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        p.setPen(QColor("#5a626c"))
        p.setBrush(QColor("#262930"))
        p.drawRoundedRect(r, 3, 3)
        frac = self._value / self._maximum
        if frac > 0:
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(QColor("#5a8fd6"))
            p.drawRoundedRect(QRectF(r.x(), r.y(), r.width() * frac, r.height()), 3, 3)
        p.setPen(QColor("#e0e0e0"))
        p.drawText(r, Qt.AlignmentFlag.AlignCenter, f"{100 * frac:.0f}%")
        p.end()
