"""What :meth:`pcl_viewer.pipeline.Pipeline.run` yields: progress and partial results.

Every event is immutable and says how far the run is (``i`` of ``n`` done in
``stage``); the subclasses also carry one partial result. A result never changes after
it was yielded: the generator makes new objects for later stages, so a consumer in
another thread (the viewer's Qt thread) may keep what it was given.

===================  ===========  ==========================================
event                stage        carries
===================  ===========  ==========================================
:class:`Step`        any          progress only
:class:`ParentsReady` parents     a snapshot of the result: scan, parents,
                                  probabilities, the factual view
:class:`DomainReady`  domain      the scan's domain check
:class:`ViewReady`    decode,     a view whose ``part`` is new: ``"image"``
                      segment,    (a counterfactual decoded), ``"labels"``
                      chromap     or ``"chromap"`` (its overlay)
:class:`QualityReady` quality     the counterfactual views with their quality
:class:`TableReady`   consistency the consistency rows
===================  ===========  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pcl_viewer.domain import DomainResult
    from pcl_viewer.pipeline import ConsistencyRow, PipelineResult, View

ViewPart = Literal["image", "labels", "chromap"]


@dataclass(frozen=True)
class Step:
    """Progress: ``i`` of ``n`` done in ``stage``."""

    stage: str
    i: int
    n: int


@dataclass(frozen=True)
class ParentsReady(Step):
    """The scan's parents are known: ``result`` is a snapshot with the factual view only."""

    result: PipelineResult


@dataclass(frozen=True)
class DomainReady(Step):
    """The domain check of the scan."""

    domain: DomainResult


@dataclass(frozen=True)
class ViewReady(Step):
    """``view`` with its ``part`` new: ``"image"``, ``"labels"`` or ``"chromap"``."""

    view: View
    part: ViewPart


@dataclass(frozen=True)
class QualityReady(Step):
    """The counterfactual views, each with its :class:`~pcl_viewer.pipeline.ViewQuality`."""

    views: tuple[View, ...]


@dataclass(frozen=True)
class TableReady(Step):
    """The consistency rows of the counterfactuals against the factual view."""

    rows: tuple[ConsistencyRow, ...]


#: The events that carry a partial result (every one but the plain :class:`Step`).
RESULT_EVENTS: tuple[type[Step], ...] = (ParentsReady, DomainReady, ViewReady, QualityReady,
                                         TableReady)
