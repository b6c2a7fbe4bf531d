"""One loaded pipeline per process (micro-sam's singleton state pattern).

Loading bundles costs a second or two; every widget and menu command of the
process shares the pipeline for the same (cf bundle, seg bundle, device).
"""

from __future__ import annotations

import threading
from collections.abc import Generator

from pcl_viewer.events import Step
from pcl_viewer.pipeline import Pipeline


class AppState:
    pipeline: Pipeline | None = None
    key: tuple[str, str, str] | None = None
    _lock = threading.Lock()  # one loader at a time (a preload and a run's load stage)
    preload_thread: threading.Thread | None = None
    preload_seconds: float | None = None

    @classmethod
    def get(cls, cf_bundle: str, seg_bundle: str, device: str) -> Pipeline | None:
        key = (cf_bundle, seg_bundle, device)
        return cls.pipeline if cls.key == key else None

    @classmethod
    def load(cls, cf_bundle: str, seg_bundle: str,
             device: str) -> Generator[Step, None, Pipeline]:
        """Generator stage ``load``: the cached pipeline, or a freshly loaded one.

        A bundle that fails to load is skipped (``pipeline.load_errors``); when
        neither loads, a ValueError says why.
        """
        cached = cls.get(cf_bundle, seg_bundle, device)
        if cached is not None:
            return cached
        yield Step("load", 0, 1)
        with cls._lock:  # a preload of the same bundles finishes first and is used
            pipe = cls.get(cf_bundle, seg_bundle, device) or cls._load(cf_bundle, seg_bundle,
                                                                        device)
        yield Step("load", 1, 1)
        return pipe

    @classmethod
    def _load(cls, cf_bundle: str, seg_bundle: str, device: str) -> Pipeline:
        pipe = Pipeline.from_bundles(cf_bundle or None, seg_bundle or None, device, strict=False)
        if pipe.cf is None and pipe.seg is None:
            raise ValueError("no model could be loaded: " + "; ".join(pipe.load_errors))
        cls.pipeline, cls.key = pipe, (cf_bundle, seg_bundle, device)
        return pipe

    @classmethod
    def preload(cls, cf_bundle: str, seg_bundle: str, device: str) -> threading.Thread:
        """Load the bundles and warm the models up in a background thread (one small run,
        so the first real run does not pay for first-call kernel set-up). A run started
        meanwhile waits for it in its ``load`` stage instead of loading twice."""
        import time

        from pcl_viewer.device import limited_threads
        from pcl_viewer_napari._workers import worker_threads

        def job() -> None:
            t0 = time.perf_counter()
            with cls._lock, limited_threads(worker_threads()):
                try:
                    pipe = cls.get(cf_bundle, seg_bundle, device) or cls._load(
                        cf_bundle, seg_bundle, device)
                    pipe.warm_up()
                except Exception:  # the run's own load stage reports it readably
                    return
            cls.preload_seconds = time.perf_counter() - t0

        cls.preload_thread = threading.Thread(target=job, name="pcl-viewer preload",
                                              daemon=True)
        cls.preload_thread.start()
        return cls.preload_thread

    @classmethod
    def set(cls, pipeline: Pipeline, cf_bundle: str, seg_bundle: str, device: str) -> None:
        """Install a ready pipeline (tests, the benchmark)."""
        cls.pipeline, cls.key = pipeline, (cf_bundle, seg_bundle, device)

    @classmethod
    def load_notice(cls) -> str:
        """The skipped bundles' errors of the loaded pipeline, one per line after a newline
        (each cut to 300 characters), or ""."""
        pipe = cls.pipeline
        if pipe is not None and pipe.load_errors:
            return "\n" + "\n".join(e if len(e) < 300 else e[:300] + "…" for e in pipe.load_errors)
        return ""
