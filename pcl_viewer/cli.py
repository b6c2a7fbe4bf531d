"""The ``pcl`` command line. Subcommands live in :mod:`pcl_viewer.commands` and
are imported only when invoked, so ``pcl --help`` does not import torch."""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", one-line help). Each module owns its commands.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("pcl_viewer.commands.phantom:phantom", "Phantom CXR data: priors, generate, silver, montage, samples, calibrate, independent, ceiling."),
    "train-cf": ("pcl_viewer.commands.cf:train_cf", "Train the counterfactual HVAE and attribute classifiers."),
    "eval-cf": ("pcl_viewer.commands.cf:eval_cf", "Measure counterfactual quality against the phantom's truth."),
    "cf": ("pcl_viewer.commands.cf:cf", "Counterfactual of one scan of any size."),
    "precompute-cf": ("pcl_viewer.commands.cf:precompute_cf", "Write counterfactual views of a pool into the cache."),
    "pretrain": ("pcl_viewer.commands.pretrain:pretrain", "Dense contrastive pre-training (DVD-CL, MVD-CL, ...)."),
    "bench": ("pcl_viewer.commands.bench:bench", "Fine-tuning benchmark over all pre-training methods."),
    "segment": ("pcl_viewer.commands.segment:segment", "Segment the lungs of one scan."),
    "train-seg": ("pcl_viewer.commands.trainseg:train_seg", "Train the shipped lung segmentation bundle on the phantom."),
    "evaluate": ("pcl_viewer.commands.evaluate:evaluate", "Evaluate a segmentation bundle on fresh phantom data."),
    "chromap": ("pcl_viewer.commands.chromap:chromap", "CHRO-map figure of one scan and its counterfactuals."),
    "review": ("pcl_viewer.commands.review:review", "Batch robustness review of a folder or CSV of scans."),
    "domain": ("pcl_viewer.commands.domain:domain", "Domain check: calibrate on held-out phantom scans, score scans."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[name]
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise click.ClickException(f"command {name!r} is not available: {exc}") from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pcl-viewer")
def main() -> None:
    """Pixel-level counterfactual contrastive learning for chest X-rays."""


if __name__ == "__main__":
    main()
