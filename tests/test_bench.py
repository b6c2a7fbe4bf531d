"""The benchmark grid: every cell once, resumable, and the report's CSV schema."""

import csv
import json

import numpy as np
import pytest

from pcl_viewer.evaluate.benchmark import (
    ROW_BY_SLUG,
    ROWS,
    BenchSets,
    bench_preset,
    cell_path,
    load_cells,
    plan_cells,
    run_grid,
)
from pcl_viewer.evaluate.benchmark_inputs import data_key
from pcl_viewer.evaluate.benchmark_report import (
    CELL_COLUMNS,
    CLAIM_COLUMNS,
    CLAIMS,
    EFFICIENCY_COLUMNS,
    MAIN_COLUMNS,
    judge_claims,
    loss_comparison,
    paired_table,
    provenance,
    write_report,
)
from pcl_viewer.models.unet import build_unet
from pcl_viewer.train.finetune import save_segmentation_bundle

# One torch thread for the module (a `pcl bench` run sets its own --threads, 1 by
# default): on a shared 2-core machine more threads only spin (10x slower when loaded).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy_sets(n: int = 16, size: int = 64, seed: int = 0) -> BenchSets:
    """Bright rectangles on noise: lung-like labels a tiny U-Net can start to learn."""
    rng = np.random.default_rng(seed)
    imgs = rng.random((n, 1, size, size)).astype(np.float32) * 0.3
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        t, b = rng.integers(6, 14), rng.integers(44, 58)
        masks[i, t:b, 6:28], masks[i, t:b, 36:58] = 1, 2
    imgs[:, 0][masks > 0] += 0.5
    eff = np.arange(n) % 3 == 0
    patients = np.array([f"p{i // 2}" for i in range(n)])
    ood = {"portable": (imgs[:4] * 0.8, masks[:4]), "severe": (imgs[4:8], masks[4:8])}
    return BenchSets(imgs, masks, eff, patients, ood)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    preset = bench_preset("smoke")
    sets = _toy_sets()
    pre = tmp / "pretrained"
    save_segmentation_bundle(pre, build_unet("smoke"), {"name": "toy", "kind": "pretrained"})
    calls = []

    def init(row, seed):
        calls.append((row.slug, seed))
        return pre if row.kind != "none" else None

    rows = [ROW_BY_SLUG[s] for s in ("none", "dvd-cl")]
    first = run_grid(preset, sets, tmp / "cells", init, rows=rows, show_progress=False)
    second = run_grid(preset, sets, tmp / "cells", init, rows=rows, show_progress=False)
    return tmp, preset, rows, first, second, calls


def test_grid_runs_every_cell_once_then_resumes_without_recomputing(grid):
    tmp, preset, rows, first, second, calls = grid
    # None: one seed (nothing pre-trained); DVD-CL: the preset's two seeds
    n_cells = (1 + 2) * preset.n_folds * len(preset.budgets)
    assert preset.n_cells(rows) == n_cells == 18
    assert first == {"done": 0, "ran": n_cells, "left": 0, "skipped_rows": {}}
    assert second == {"done": n_cells, "ran": 0, "left": 0, "skipped_rows": {}}
    # each (row, pre-training seed) initialised once
    assert sorted(calls) == [("dvd-cl", 0), ("dvd-cl", 1), ("none", 0)]
    cell = json.loads(cell_path(tmp / "cells", "dvd-cl", 1, 1, "all").read_text())
    assert cell["n_train"] == 8 and set(cell["scores"]) == {"overall", "nf", "pe", "portable", "severe"}
    assert 0 <= cell["scores"]["overall"]["dice"] <= 100 and cell["seed"] == 1
    few = json.loads(cell_path(tmp / "cells", "dvd-cl", 0, 1, "8").read_text())
    assert set(few["scores"]) == {"overall", "nf", "pe"}  # OOD sets only at the full budget
    # Paired cells: the same fine-tuning seed for every row and pre-training seed of a fold.
    other = json.loads(cell_path(tmp / "cells", "none", 0, 1, "all").read_text())
    assert cell["finetune"]["seed"] == other["finetune"]["seed"] == 1000
    assert not cell_path(tmp / "cells", "none", 1, 1, "all").exists()


def test_report_writes_the_csv_schema_markdown_and_figures(grid):
    tmp, preset, rows, *_ = grid
    cells = load_cells(tmp / "cells")
    info = write_report(cells, tmp / "results", tmp / "figures", "# test")
    assert info["methods"] == len(rows) and info["cells"] == len(cells) == 18
    with open(tmp / "results" / "benchmark.csv") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == MAIN_COLUMNS
    assert [r["method"] for r in table] == [r.name for r in ROWS if r in rows]
    assert all(0 <= float(r["dsc"]) <= 100 and r["n_folds"] == "2" for r in table)
    assert [r["n_seeds"] for r in table] == ["1", "2"]
    with open(tmp / "results" / "label_efficiency.csv") as fh:
        eff = list(csv.DictReader(fh))
    assert tuple(eff[0]) == EFFICIENCY_COLUMNS
    assert {r["budget"] for r in eff} == {"8", "32", "all"}
    md = (tmp / "results" / "benchmark.md").read_text()
    assert "DVD-CL > VADeR" in md and "92.76" in md  # our row beside the paper's
    with open(tmp / "results" / "cells.csv") as fh:
        rows_csv = list(csv.DictReader(fh))
    assert tuple(rows_csv[0]) == CELL_COLUMNS and len(rows_csv) == 18
    w = [r for r in rows_csv if r["row"] == "dvd-cl" and r["budget"] == "all"][0]
    assert float(w["dice_w74"]) == pytest.approx(
        0.74 * float(w["dice_pe"]) + 0.26 * float(w["dice_nf"]), abs=2e-3)
    with open(tmp / "results" / "claims.csv") as fh:
        claims_csv = list(csv.DictReader(fh))
    assert tuple(claims_csv[0]) == CLAIM_COLUMNS
    # only None and DVD-CL ran: every claim needs another row, so none is measured
    assert {r["verdict"] for r in claims_csv} == {"not measured"}
    assert "| DVD-CL |" in (tmp / "results" / "benchmark_readme.md").read_text()
    # the committed cells.csv alone regenerates the same tables and claims
    from pcl_viewer.evaluate.benchmark_report import aggregate, cells_from_csv

    back = cells_from_csv(tmp / "results" / "cells.csv")
    for x, y in zip(aggregate(back)[0] + aggregate(back)[1],
                    aggregate(cells)[0] + aggregate(cells)[1], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=2e-3, nan_ok=True) if isinstance(
                x[k], float) else x[k] == y[k], k
    assert len(judge_claims(back)) == len(judge_claims(cells))
    assert (tmp / "figures" / "benchmark.png").stat().st_size > 1000
    assert (tmp / "figures" / "label_efficiency.png").stat().st_size > 1000


def _sc(dsc, pe=None, nf=None):
    return {"overall": {"dice": dsc}, "pe": {"dice": dsc - 1 if pe is None else pe, "n": 5},
            "nf": {"dice": dsc + 1 if nf is None else nf, "n": 5}}


def _grid_cells(row, values, budget="all"):
    """values[s][k] -> cells of ``row`` for pre-training seed s and fold k."""
    return [{"row": row, "seed": s, "fold": k, "budget": budget, "scores": _sc(v)}
            for s, vs in enumerate(values) for k, v in enumerate(vs)]


def test_paired_table_pairs_by_seed_and_fold_and_the_none_row_with_every_seed():
    from pcl_viewer.evaluate.benchmark_report import _by

    cells = (_grid_cells("dvd-cl", [[90, 91, 92], [80, 81, 82]])
             + _grid_cells("vader", [[89, 89, 89], [79, 79, 79]])
             + _grid_cells("none", [[85, 86, 87]]))
    by = _by(cells)
    table, seeds, folds = paired_table(by[("dvd-cl", "all")], by[("vader", "all")], "dsc")
    assert table.tolist() == [[1, 2, 3], [1, 2, 3]] and seeds == [0, 1] and folds == [0, 1, 2]
    table, seeds, _ = paired_table(by[("dvd-cl", "all")], by[("none", "all")], "dsc")
    assert table.tolist() == [[5, 5, 5], [-5, -5, -5]] and seeds == [0, 1]
    table, _, _ = paired_table(by[("none", "all")], by[("dvd-cl", "all")], "dsc")
    assert table.tolist() == [[-5, -5, -5], [5, 5, 5]]
    # a fold missing for one seed drops that fold for every seed (complete crossed table)
    del by[("vader", "all")][(1, 2)]
    table, seeds, folds = paired_table(by[("dvd-cl", "all")], by[("vader", "all")], "dsc")
    assert folds == [0, 1] and table.shape == (2, 2)


def test_claims_verdicts_on_a_synthetic_table_with_a_known_answer():
    """DVD-CL is 2 points above VADeR in every cell up to small noise (holds); MVD-CL is
    3 points below MVD-aug (reversed); S-DVD-CL ties S-DVD-aug (undecided); S-MVD-CL is
    0.5 below silver, inside the 1-point margin (>= holds)."""
    rng = np.random.default_rng(1)
    base = 85 + rng.normal(0, 1, (3, 5))  # shared seed x fold structure
    noise = lambda: rng.normal(0, 0.05, (3, 5))  # noqa: E731
    cells = (_grid_cells("vader", base) + _grid_cells("dvd-cl", base + 2 + noise())
             + _grid_cells("mvd-aug", base) + _grid_cells("mvd-cl", base - 3 + noise())
             + _grid_cells("s-dvd-aug", base) + _grid_cells("s-dvd-cl", base + rng.normal(0, 1, (3, 5)))
             + _grid_cells("seg-silver", base) + _grid_cells("s-mvd-cl", base - 0.5 + noise()))
    out = {r["claim"]: r for r in judge_claims(cells) if r["metric"] == "dsc"}
    dvd = out["DVD-CL > VADeR"]
    assert dvd["verdict"] == "holds" and dvd["mean_diff"] == pytest.approx(2, abs=0.05)
    assert dvd["ci_low"] < 2 < dvd["ci_high"] and dvd["n_seeds"] == 3 and dvd["n_folds"] == 5
    mvd = next(r for c, r in out.items() if c.startswith("MVD-CL > MVD-aug"))
    assert mvd["verdict"] == "reversed" and mvd["mean_diff"] == pytest.approx(-3, abs=0.05)
    sdvd = next(r for c, r in out.items() if c.startswith("S-DVD-CL > S-DVD-aug"))
    assert sdvd["verdict"] == "undecided"
    ni = next(r for c, r in out.items() if c.startswith("S-MVD-CL >= Segmentation"))
    assert ni["verdict"] == "holds" and ni["null"] == -1.0 and ni["mean_diff"] < 0
    assert out["S-MVD-CL oracle views > model views"]["verdict"] == "not measured"
    # Holm: the adjusted p is at least the raw p, and the family is every measured line
    measured = [r for r in judge_claims(cells) if r["family"] == "primary" and np.isfinite(r["p"])]
    primary = [r for r in judge_claims(cells) if r["family"] == "primary"]
    assert len(primary) == len(CLAIMS)  # one budget here: one line per claim
    assert all(r["p_holm"] >= r["p"] for r in measured)
    # the smallest p is multiplied by the family size: the measured primary lines
    smallest = min(measured, key=lambda r: r["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(measured) * smallest["p"]))
    # DVD>VADeR, MVD and S-DVD vs aug, >= silver, best overall, S-DVD>DVD, S-MVD>MVD
    assert len(measured) == 7


def test_best_overall_is_an_intersection_union_test():
    from pcl_viewer.evaluate.benchmark_report import Claim

    rng = np.random.default_rng(2)
    base = 85 + rng.normal(0, 1, (3, 5))
    best = Claim("A best", "s-mvd-cl", ("vader", "ssdcl"), "best")
    cells = (_grid_cells("s-mvd-cl", base + 1 + rng.normal(0, 0.05, (3, 5)))
             + _grid_cells("vader", base) + _grid_cells("ssdcl", base + 0.8))
    (r,) = judge_claims(cells, claims=(best,))[:1]
    assert r["verdict"] == "holds" and r["mean_diff"] == pytest.approx(0.2, abs=0.05)
    assert "closest: SSDCL" in r["detail"]
    cells = [c for c in cells if c["row"] != "ssdcl"] + _grid_cells("ssdcl", base + 2)
    (r,) = judge_claims(cells, claims=(best,))[:1]
    assert r["verdict"] == "reversed" and r["mean_diff"] == pytest.approx(-1, abs=0.05)


def _cell(row, fold, dsc, budget="all", command="pcl bench --rows ROWX", device="cpu"):
    return {"row": row, "fold": fold, "budget": budget, "seconds": 10.0,
            "command": command.replace("ROWX", row), "commit": "abc",
            "train_log": {"device": device},
            "scores": {"overall": {"dice": dsc}, "pe": {"dice": dsc - 1}}}


def test_loss_comparison_pairs_cells_by_row_fold_and_budget():
    ce = [_cell("none", k, 90.0 + k) for k in range(3)] + [_cell("vader", 0, 80.0)]
    other = [_cell("none", k, 91.0 + k) for k in range(2)] + [_cell("vader", 0, 79.0),
                                                                _cell("vader", 1, 99.0)]
    rows = {r["method"]: r for r in loss_comparison(ce, other)}
    assert rows["None"]["n_pairs"] == 2 and rows["None"]["diff"] == pytest.approx(1.0)
    assert rows["None"]["dsc_ce"] == pytest.approx(90.5)
    assert rows["VADeR"]["n_pairs"] == 1 and rows["VADeR"]["diff"] == pytest.approx(-1.0)
    assert rows["all rows"]["n_pairs"] == 3
    assert rows["all rows"]["diff"] == pytest.approx(1 / 3)
    assert np.isnan(rows["all rows"]["diff_portable"])  # no portable scores in these cells
    assert rows["None"]["same_init"] == "yes"  # random init on both sides
    assert rows["VADeR"]["same_init"] == "yes"  # _cell records no init: random on both sides
    for c in ce + other:
        c["init"] = "bundle" if c["row"] == "vader" else None
    rows = {r["method"]: r for r in loss_comparison(ce, other)}
    assert rows["VADeR"]["same_init"] == "unknown"  # a bundle, but no fingerprint recorded


def test_loss_comparison_skips_pairs_without_a_finite_dice_and_compares_inits():
    ce = [_cell("vader", k, 90.0) for k in range(3)]
    other = [_cell("vader", 0, 91.0), _cell("vader", 1, float("nan")), _cell("vader", 2, 93.0)]
    for c in ce + other:
        c["init"], c["init_fingerprint"] = "bundle", "f1"
    other[2]["init_fingerprint"] = "f2"
    (row,) = [r for r in loss_comparison(ce, other) if r["method"] == "VADeR"]
    assert row["n_pairs"] == 2 and row["diff"] == pytest.approx(2.0)
    assert row["dsc_other"] == pytest.approx(92.0) and row["same_init"] == "no"


def test_provenance_groups_row_processes_of_one_run():
    cells = [_cell(r, 0, 90.0) for r in ("none", "vader")] + [_cell("none", 1, 90.0,
                                                                    device="cuda:0")]
    text = provenance(cells)
    assert "2 cells: `pcl bench --rows ROWS` at commit `abc` on cpu, 20 s" in text
    assert "1 cells: `pcl bench --rows ROWS` at commit `abc` on cuda:0" in text


def test_smoke_preset_end_to_end_cli_is_resumable(tmp_path):
    """`pcl bench --preset smoke`: phantom sets, silver labels, pre-training, fine-tuning,
    MONAI scores, report; a second run computes nothing."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    args = ["--preset", "smoke", "--out", str(tmp_path / "results"), "--cache",
            str(tmp_path / "cache"), "--rows", "none,seg-silver,s-mvd-cl-oracle"]
    first = CliRunner().invoke(bench, args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    # None 1 seed, the other two rows 2 seeds each, x 2 folds x 3 budgets
    assert "0 already done, 30 computed now, 0 left" in first.output
    second = CliRunner().invoke(bench, args)
    assert "30 already done, 0 computed now, 0 left" in second.output
    with open(tmp_path / "results" / "benchmark.csv") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == MAIN_COLUMNS
    assert [r["method"] for r in table] == ["None", "Segmentation (silver)", "S-MVD-CL (oracle CF)"]
    runs = tmp_path / "cache" / "runs" / "smoke" / data_key()
    for seed in (0, 1):
        card = json.loads((runs / "s-mvd-cl-oracle" / f"seed{seed}" / "bundle" / "card.json"
                           ).read_text())
        assert card["kind"] == "pretrained" and card["training"]["seed"] == seed
    with open(tmp_path / "results" / "pretrain_curves.csv") as fh:
        curves = list(csv.DictReader(fh))
    assert {(r["row"], r["seed"]) for r in curves} == {("s-mvd-cl-oracle", "0"),
                                                      ("s-mvd-cl-oracle", "1")}
    assert all(r["probe_dice"] != "" for r in curves)
    assert (tmp_path / "figures" / "pretrain_curves.png").stat().st_size > 1000
    # Another fine-tuning loss keeps its cells apart and is compared in the report.
    dice = CliRunner().invoke(bench, ["--preset", "smoke", "--cache", str(tmp_path / "cache"),
                                      "--rows", "none", "--loss", "dicece",
                                      "--out", str(tmp_path / "dc")])
    assert dice.exit_code == 0, dice.output + repr(dice.exception)
    assert "0 already done, 6 computed now, 0 left" in dice.output
    assert len(load_cells(runs / "cells-dicece")) == 6 and len(load_cells(runs / "cells")) == 30
    assert json.loads(next((runs / "cells-dicece" / "none").glob("seed0/*.json")).read_text())[
        "finetune"]["loss"] == "dicece"
    again = CliRunner().invoke(bench, [*args, "--report-only"])
    assert "## Fine-tuning loss: Dice+CE vs cross-entropy" in (
        tmp_path / "results" / "benchmark.md").read_text()
    with open(tmp_path / "results" / "loss_comparison.csv") as fh:
        none = [r for r in csv.DictReader(fh) if r["method"] == "None"]
    assert len(none) == len(bench_preset("smoke").budgets)
    assert all(r["n_pairs"] == "2" for r in none)
    assert again.exit_code == 0


def test_prepare_makes_the_shared_inputs_and_no_cells(tmp_path):
    """`pcl bench --prepare`: gold/OOD sets and the silver-labelled pool, then stop."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    cache = tmp_path / "cache"
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--cache", str(cache), "--prepare"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    for name in ("gold", "portable", "severe", "pool"):
        assert (cache / "data" / "smoke" / name / ".complete").is_file(), name
    assert (cache / "data" / "smoke" / "pool" / "silver_masks.csv").is_file()
    assert list((cache / "data" / "smoke" / "pool" / ".cache").glob("arrays_64_*.npz"))
    assert not (cache / "runs" / "smoke" / data_key() / "cells").exists()


def test_jobs_runs_rows_in_worker_processes_and_reports_once(tmp_path):
    """`pcl bench --jobs 2`: inputs prepared once, one process per row, one report."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    args = ["--preset", "smoke", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
            "--rows", "none,dvd-cl-dagger", "--jobs", "2"]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    # one process per (row, seed): none seed 0, dvd-cl-dagger seeds 0 and 1
    assert "rows: 3 finished, 0 failed" in r.output
    runs = tmp_path / "c" / "runs" / "smoke" / data_key()
    cells = load_cells(runs / "cells")
    assert len(cells) == 3 * len(bench_preset("smoke").budgets) * bench_preset("smoke").n_folds
    # Every row process records the parent's command (here CliRunner's fallback text).
    assert {c["command"] for c in cells} == {f"pcl bench --preset smoke --out {tmp_path / 'r'}"}
    assert sorted(p.name for p in (runs / "logs").iterdir()) == [
        "dvd-cl-dagger-seed0.log", "dvd-cl-dagger-seed1.log", "none-seed0.log"]
    with open(tmp_path / "r" / "benchmark.csv") as fh:
        assert [row["method"] for row in csv.DictReader(fh)] == ["None", "DVD-CL†"]
    again = CliRunner().invoke(bench, args)  # resumable: nothing left to compute
    assert again.exit_code == 0 and "rows: 3 finished" in again.output
    assert len(load_cells(runs / "cells")) == len(cells)


def test_a_failing_row_process_is_reported_with_its_log(tmp_path):
    from pcl_viewer.evaluate.parallel import run_rows_in_processes

    said = []
    status = run_rows_in_processes([("none-seed0", ["--rows", "none", "--seeds", "0"])], 1,
                                   ["--preset", "smoke", "--no-such-option"],
                                   tmp_path / "cells", 6, tmp_path / "logs", "pcl bench",
                                   echo=said.append, poll_s=0.2, show_progress=False)
    assert status == {"none-seed0": 2}
    assert said and "none-seed0 failed (exit 2)" in said[0]
    assert "no-such-option" in (tmp_path / "logs" / "none-seed0.log").read_text()


def test_another_loss_never_overwrites_the_main_tables_by_default(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--cache", str(tmp_path / "c"),
                                   "--report-only", "--loss", "dicece"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (tmp_path / "docs" / "results" / "dicece" / "benchmark.md").is_file()
    assert not (tmp_path / "docs" / "results" / "benchmark.md").exists()


def test_unavailable_row_is_skipped_and_reported(tmp_path):
    from pcl_viewer.evaluate.benchmark import RowUnavailable

    def init(row, seed):
        if row.slug == "dvd-cl":
            raise RowUnavailable("no counterfactual model")
        return None

    rows = [ROW_BY_SLUG["none"], ROW_BY_SLUG["dvd-cl"]]
    res = run_grid(bench_preset("smoke"), _toy_sets(), tmp_path, init, rows=rows,
                   show_progress=False, max_cells=2)
    assert res["skipped_rows"] == {"dvd-cl": "no counterfactual model"}
    assert not (tmp_path / "dvd-cl").exists()


def test_cached_pretraining_with_another_cf_model_is_refused(tmp_path, monkeypatch):
    from pcl_viewer.evaluate.benchmark import RowUnavailable
    from pcl_viewer.evaluate.benchmark_inputs import RowInitialiser

    init = RowInitialiser(bench_preset("smoke"), tmp_path / "data", tmp_path / "runs")
    monkeypatch.setattr(init, "has_cf_model", lambda: True)
    monkeypatch.setattr(init, "_cf_fingerprint", lambda: "new")
    (tmp_path / "runs" / "dvd-cl" / "seed1").mkdir(parents=True)
    (tmp_path / "runs" / "dvd-cl" / "seed1" / "cf_bundle.txt").write_text("old\n")
    with pytest.raises(RowUnavailable, match="pre-trained with CF model old"):
        init.check_cf_views(ROW_BY_SLUG["dvd-cl"], 1)
    init.check_cf_views(ROW_BY_SLUG["dvd-cl"], 0)  # seed 0 has no stamp yet
    init.check_cf_views(ROW_BY_SLUG["dvd-cl-dagger"])  # no CF views: nothing to check


def test_bench_refuses_to_mix_devices_in_one_grid(tmp_path):
    """Cells fine-tuned on CUDA and on the CPU must not end up in one table."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench, check_cell_devices

    cells = tmp_path / "cache" / "runs" / "smoke" / data_key() / "cells"
    cell = cells / "none" / "seed0" / "fold0-all.json"
    cell.parent.mkdir(parents=True)
    cell.write_text(json.dumps({"row": "none", "train_log": {"device": "cuda:0"}}))
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--out", str(tmp_path / "results"),
                                   "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert r.exit_code == 1 and "1 finished cells" in r.output and "--device cuda" in r.output
    assert not (tmp_path / "cache" / "data").exists()  # refused before generating any data
    check_cell_devices([{"train_log": {"device": "cuda"}}], "cuda:0", cells)
    check_cell_devices([{"train_log": {}}, {}], "cpu", cells)  # older cells: the CPU
    with pytest.raises(Exception, match="fine-tuned on cpu"):
        check_cell_devices([{"train_log": {"steps": 1}}], "cuda", cells)


def test_pretrain_first_initialises_every_row_before_any_cell(monkeypatch, tmp_path):
    """With pretrain_first every row's initialisation runs before the first fine-tuning."""
    import numpy as np

    from pcl_viewer.evaluate import benchmark as bm

    events: list[str] = []

    def fake_finetune(images, masks, unet_cfg, cfg, pretrained=None, progress=None):
        events.append("finetune")
        return object(), {}

    monkeypatch.setattr(bm, "finetune", fake_finetune)
    monkeypatch.setattr(bm, "score_subsets", lambda *a, **k: {})
    preset = bm.bench_preset("smoke")
    n = 16
    rng = np.random.default_rng(0)
    sets = bm.BenchSets(rng.random((n, 1, 8, 8), dtype=np.float32), np.zeros((n, 8, 8), np.uint8),
                        np.arange(n) % 3 == 0, np.array([f"p{i}" for i in range(n)]), {})
    rows = [bm.ROW_BY_SLUG["none"], bm.ROW_BY_SLUG["vader"]]

    def init_for(row, seed):
        events.append(f"init {row.slug}")
        return None

    res = bm.run_grid(preset, sets, tmp_path, init_for, rows=rows, show_progress=False,
                      max_cells=3, pretrain_first=True)
    assert res["ran"] == 3
    assert events[:2] == ["init none", "init vader"] and events[2:] == ["finetune"] * 3


def test_report_only_rebuilds_from_a_committed_cells_csv_without_the_cache(grid, tmp_path):
    """A clone has docs/results/cells.csv but no cell cache: --report-only uses the CSV."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    tmp, *_ = grid
    out = tmp_path / "results"
    write_report(load_cells(tmp / "cells"), out, tmp_path / "figures", "# first")
    (out / "benchmark.md").unlink()
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--cache", str(tmp_path / "empty"),
                                   "--out", str(out), "--rows", "none,dvd-cl", "--report-only"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"read 18 from {out / 'cells.csv'}" in r.output
    md = (out / "benchmark.md").read_text()
    assert "from 18 of 18 cells" in md and "| DVD-CL | 2 x 2 |" in md


def test_folds_and_budgets_run_a_subset_that_a_later_run_extends(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    args = ["--preset", "smoke", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
            "--rows", "none", "--threads", "1"]
    first = CliRunner().invoke(bench, [*args, "--folds", "1", "--budgets", "all"])
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert "0 already done, 1 computed now, 0 left" in first.output
    more = CliRunner().invoke(bench, [*args, "--folds", "0,1"])
    assert "1 already done, 5 computed now, 0 left" in more.output
    cells = load_cells(tmp_path / "c" / "runs" / "smoke" / data_key() / "cells")
    assert sorted((c["fold"], c["budget"]) for c in cells) == [
        (k, b) for k in (0, 1) for b in ("32", "8", "all")]
    bad = CliRunner().invoke(bench, [*args, "--budgets", "16"])
    assert bad.exit_code == 2 and "budgets are 8, 32, all" in bad.output


def test_the_none_row_runs_once_as_seed_0_whatever_seeds_a_run_asks_for():
    from dataclasses import replace

    preset = replace(bench_preset("smoke"), seeds=(1, 2))
    none, vader = ROW_BY_SLUG["none"], ROW_BY_SLUG["vader"]
    assert preset.row_seeds(none) == (0,) and preset.row_seeds(vader) == (1, 2)
    cells = plan_cells(preset, _toy_sets(), [none, vader])
    assert {(c.row.slug, c.seed) for c in cells} == {("none", 0), ("vader", 1), ("vader", 2)}
    assert preset.n_cells([none, vader]) == len(cells) == 3 * 2 * 3


def test_readme_gets_the_section_between_its_markers_and_nothing_else(grid, tmp_path):
    """--readme replaces only the marked section (twice in a row gives the same file);
    a README without the markers is refused before it is touched."""
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench
    from pcl_viewer.evaluate.benchmark_report import README_BEGIN, README_END

    tmp, *_ = grid
    out = tmp_path / "results"
    write_report(load_cells(tmp / "cells"), out, tmp_path / "figures", "# first")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    args = ["--preset", "smoke", "--cache", str(tmp_path / "empty"), "--out", str(out),
            "--rows", "none,dvd-cl", "--report-only", "--readme", str(readme)]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    text = readme.read_text()
    assert "old table" not in text and "| DVD-CL |" in text
    assert text.startswith("# Title\n\nbefore\n" + README_BEGIN) and text.endswith(README_END + "\nafter\n")
    assert CliRunner().invoke(bench, args).exit_code == 0 and readme.read_text() == text
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    r = CliRunner().invoke(bench, [*args[:-1], str(bare)])
    assert r.exit_code != 0 and "benchmark:begin" in r.output
    assert bare.read_text() == "no markers\n"
    # a partial grid (a row with no cells asked for) never reaches the README
    r = CliRunner().invoke(bench, [*args[:6], "--rows", "none,dvd-cl,mvd-cl", *args[8:]])
    assert r.exit_code == 0 and "left as it was: the report is partial" in r.output
    assert readme.read_text() == text
    # Windows line endings and non-ASCII text survive
    crlf = tmp_path / "CRLF.md"
    crlf.write_bytes(f"Dagger \u2020\r\n{README_BEGIN}\r\nx\r\n{README_END}\r\nend\r\n".encode())
    assert CliRunner().invoke(bench, [*args[:-1], str(crlf)]).exit_code == 0
    raw = crlf.read_bytes().decode("utf-8")
    assert raw.startswith("Dagger \u2020\r\n") and "\n" not in raw.replace("\r\n", "")


def test_a_bundle_is_scored_on_every_fold_s_test_images_once(monkeypatch):
    from pcl_viewer.evaluate import benchmark
    from pcl_viewer.evaluate.benchmark import score_bundle_on_folds
    from pcl_viewer.evaluate.folds import patient_folds

    preset = bench_preset("smoke")
    sets = _toy_sets()
    calls = []
    real_predict = benchmark.predict
    monkeypatch.setattr(benchmark, "predict",
                        lambda model, x: calls.append(len(x)) or real_predict(model, x))
    rows = score_bundle_on_folds(preset, sets, build_unet("smoke").eval())
    # each fold's test images once, each out-of-distribution set once (it has no folds)
    assert len(calls) == len(preset.fold_ids()) + len(sets.ood) and sets.ood
    for name in sets.ood:
        assert all(r[name] == rows[0][name] for r in rows)
    assert [r["fold"] for r in rows] == list(preset.fold_ids())
    folds = patient_folds(sets.effusion, sets.patients, preset.n_folds, preset.fold_seed)
    for r in rows:
        test = folds[r["fold"]][1]
        assert r["overall"]["n"] == len(test) and r["pe"]["n"] == int(sets.effusion[test].sum())
        assert 0 <= r["overall"]["dice"] <= 100 and set(sets.ood) <= set(r)


def test_score_bundle_prints_the_folds_and_refuses_another_image_size(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    bundle = tmp_path / "seg"
    save_segmentation_bundle(bundle, build_unet("smoke"), {"name": "toy", "kind": "segmentation"})
    args = ["--preset", "smoke", "--cache", str(tmp_path / "cache"), "--score-bundle", str(bundle)]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    lines = r.output.splitlines()
    assert "overall" in lines[1] and "w74" in lines[1]
    n_folds = len(bench_preset("smoke").fold_ids())
    assert [ln.split()[0] for ln in lines[2:2 + n_folds]] == [str(k) for k in range(n_folds)]
    assert lines[2 + n_folds].startswith("mean")
    assert not list((tmp_path / "cache" / "runs").rglob("fold*.json"))  # no cell was run
    r = CliRunner().invoke(bench, [*args[:-1], "seg-cpu"])  # the shipped 128 px bundle
    assert r.exit_code != 0 and "takes 128 px images" in r.output


def test_label_efficiency_axis_keeps_every_budget_s_rows_and_clips_only_outliers():
    from pcl_viewer.evaluate.benchmark_report import _efficiency_floor

    eff = [{"budget": "8", "dsc": d} for d in (75.4, 77.0, 81.0, 89.8, 20.0)]
    eff += [{"budget": "all", "dsc": d} for d in (89.3, 90.7, 91.8, float("nan"))]
    # the 8-label rows at 75-81 stay on the axis although the full budget sits at 89-92;
    # the collapsed 20 % cell is clipped
    assert _efficiency_floor(eff) == pytest.approx(73.4)
    assert _efficiency_floor([]) == 0.0
