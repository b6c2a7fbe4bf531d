"""``pcl domain ...``: calibrate the domain check and score scans with it."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def domain() -> None:
    """Domain check: how typical a scan is for the loaded models."""


@domain.command()
@click.option("--cf-bundle", default="cf-cpu", show_default=True,
              help="Counterfactual bundle (name under resources/models or folder).")
@click.option("--seg-bundle", default="seg-cpu", show_default=True,
              help="Segmentation bundle (its fingerprint is recorded too).")
@click.option("--n", "n", type=int, default=200, show_default=True,
              help="Held-out phantom scans to calibrate on.")
@click.option("--seed", type=int, default=7919, show_default=True,
              help="Phantom seed (use one no model was trained on).")
@click.option("--size", type=int, default=256, show_default=True, help="Rendered scan size (px).")
@click.option("--flag-rate", type=float, default=0.01, show_default=True,
              help="Share of in-domain held-out scans the threshold flags.")
@click.option("--regime", default=None, help="Phantom regime (default: the phantom's default).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Calibration file (default: resources/models/domain.json).")
def calibrate(cf_bundle: str, seg_bundle: str, n: int, seed: int, size: int, flag_rate: float,
              regime: str | None, device: str, out: Path | None) -> None:
    """Calibrate the domain check on held-out phantom scans of the training styles."""
    from pcl_viewer.domain import calibrate as run
    from pcl_viewer.domain import default_path

    try:
        cal = run(cf_bundle, seg_bundle or None, n=n, seed=seed, size=size,
                  flag_rate=flag_rate, out=out, regime=regime, device=device)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    info = cal.info
    click.echo(f"wrote {out or default_path()}: median {cal.median:.3f} bits/pixel, spread "
               f"{cal.spread:.3f}, threshold z > {cal.threshold:.2f} "
               f"({info['flagged_in_sample']}/{info['n']} held-out scans flagged), "
               f"cf {cal.fingerprints.get('cf')}, {info['seconds']:.1f} s")


@domain.command()
@click.argument("scans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--cf-bundle", default="cf-cpu", show_default=True)
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration file (default: resources/models/domain.json).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scan.")
def score(scans: tuple[Path, ...], cf_bundle: str, calibration: Path | None, device: str,
          as_json: bool) -> None:
    """Domain score of scan files (one line each) and how many were flagged."""
    from pcl_viewer.data.preprocess import to_model
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError
    from pcl_viewer.domain import DomainCheck
    from pcl_viewer.pipeline import Pipeline, _parents_from_probs

    try:
        pipe = Pipeline.from_bundles(cf_bundle, None, device)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    check = DomainCheck.for_pipeline(pipe, calibration)
    flagged = scored = 0
    for path in scans:
        try:
            scan = read_scan(path)
        except ScanReadError as exc:
            click.echo(f"{path}: cannot read ({exc})", err=True)
            continue
        x = to_model(scan.image, pipe.cf_size)[0][None]
        probs = pipe.infer_parents(x)
        (res,) = check.score(x, [_parents_from_probs(probs[0])], probs)
        scored += 1
        flagged += bool(res.out_of_domain)
        if as_json:
            click.echo(json.dumps({"scan": str(path), **res.to_dict()}))
        else:
            score_txt = "-" if res.score is None else f"{res.score:.3f}"
            click.echo(f"{path}: bpd {res.bpd:.3f} score {score_txt} "
                       f"out_of_domain {res.out_of_domain}")
    click.echo(f"{flagged}/{scored} flagged out of domain", err=True)
