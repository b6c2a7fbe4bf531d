#!/usr/bin/env bash
# One benchmark grid on a many-core (GPU) machine: prepare the data once, then one
# `pcl bench --rows ROW --seeds S` process per row and pre-training seed in parallel,
# then the report.
#
#   scripts/device_bench.sh OUT_DIR [DEADLINE_S] [PRESET] [DEVICE]
#   BENCH_SEEDS="0 1 2" BENCH_ROWS="none dvd-cl ..." BENCH_FOLDS=0,1,2,3,4 BENCH_DATA=DIR
#   BENCH_BUDGETS=8,32,all
#   BENCH_RESULTS=docs/results BENCH_FIGURES=docs/figures BENCH_CACHE=.cache
#
# Every process stops at DEADLINE_S after the start (finished cells are kept: the grid
# is resumable). OUT_DIR receives bench.tgz (cells, pre-training logs and probe scores,
# docs/results, docs/figures) and the logs. Used on the lent H200 (docs/benchmark.md);
# runs anywhere `pcl` runs (PRESET=smoke DEVICE=cpu for a dry run).
set -u
OUT=${1:?usage: device_bench.sh OUT_DIR [DEADLINE_S] [PRESET] [DEVICE]}
DEADLINE=${2:-480}
PRESET=${3:-cpu}
DEVICE=${4:-cuda}
CACHE=${BENCH_CACHE:-.cache}
LOSS=${BENCH_LOSS:-ce}   # dicece: the Dice+CE grid (cells-dicece), reported to /tmp/pcl-dicece
T0=$(date +%s)
# Seconds left before the deadline, at least 1 (`timeout 0` would mean no limit).
left() { local l=$((DEADLINE - ($(date +%s) - T0))); echo $((l > 1 ? l : 1)); }
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ROWS=${BENCH_ROWS:-"none simclr vader seg-silver ssdcl dvd-cl mvd-cl s-dvd-cl s-mvd-cl \
dvd-aug mvd-aug s-dvd-aug s-mvd-aug dvd-cl-dagger mvd-cl-dagger s-dvd-cl-dagger \
s-mvd-cl-dagger s-mvd-cl-oracle seg-gold"}
SEEDS=${BENCH_SEEDS:-"0 1 2"}
FOLDS=${BENCH_FOLDS:-0,1,2,3,4}
BUDGETS=${BENCH_BUDGETS:-8,32,all}
DATA=()
[ -n "${BENCH_DATA:-}" ] && DATA=(--data "$BENCH_DATA")
# Not every row needs the CUDA smoke: a failure there ends the run before the data work.
if [ "$DEVICE" != cpu ]; then
  timeout 150 pcl bench --preset smoke --cache /tmp/pcl-smoke --out /tmp/pcl-smoke/results \
    --device "$DEVICE" >"$OUT/logs/smoke.log" 2>&1 &
  SMOKE=$!
fi
PCL_SILVER_THREADS=${PCL_SILVER_THREADS:-8} timeout "$(left)" pcl bench --preset "$PRESET" \
  --cache "$CACHE" "${DATA[@]}" --prepare --threads 8 >"$OUT/logs/prepare.log" 2>&1
PREP=$?
echo "prepare rc=$PREP at $(( $(date +%s) - T0 )) s"; tail -5 "$OUT/logs/prepare.log"
if [ "$DEVICE" != cpu ]; then
  wait "$SMOKE"; SM=$?
  echo "smoke rc=$SM"; tail -3 "$OUT/logs/smoke.log"
  [ "$SM" = 0 ] || { tail -40 "$OUT/logs/smoke.log"; exit 3; }
fi
[ "$PREP" = 0 ] || exit 4
UNITS=()
for r in $ROWS; do
  for s in $SEEDS; do
    UNITS+=("$r:$s")
    [ "$r" = none ] && break   # nothing is pre-trained: one seed
  done
done
for u in "${UNITS[@]}"; do
  r=${u%%:*}; s=${u##*:}
  timeout "$(left)" pcl bench --preset "$PRESET" --cache "$CACHE" "${DATA[@]}" \
    --out "/tmp/pcl-res-$r-$s" --figures "/tmp/pcl-res-$r-$s/fig" --rows "$r" --seeds "$s" \
    --folds "$FOLDS" --budgets "$BUDGETS" --pretrain-first --threads 1 --device "$DEVICE" --loss "$LOSS" \
    >"$OUT/logs/$r-seed$s.log" 2>&1 &
done
wait
echo "grid processes done at $(( $(date +%s) - T0 )) s"
for u in "${UNITS[@]}"; do
  l="$OUT/logs/${u%%:*}-seed${u##*:}.log"
  printf '%s: ' "$u"; grep -E "^cells:|Error|error" "$l" | tail -1
done
RESULTS=${BENCH_RESULTS:-docs/results} FIGURES=${BENCH_FIGURES:-docs/figures}
[ "$LOSS" = ce ] || { RESULTS=/tmp/pcl-$LOSS; FIGURES=$RESULTS/fig; }
pcl bench --preset "$PRESET" --cache "$CACHE" "${DATA[@]}" --seeds "$(echo $SEEDS | tr ' ' ,)" \
  --folds "$FOLDS" --budgets "$BUDGETS" --rows "$(echo $ROWS | tr ' ' ,)" --out "$RESULTS" --figures "$FIGURES" \
  --report-only --loss "$LOSS" >"$OUT/logs/report.log" 2>&1
REPORT=$?; echo "report rc=$REPORT"; tail -2 "$OUT/logs/report.log"
# The weights of the three best rows (by Dice at the full budget), to ship one of them.
RUNS="$CACHE/runs/$PRESET/$(python3 -c "import sys; from pathlib import Path
from pcl_viewer.evaluate.benchmark_inputs import data_key
print(data_key(Path(sys.argv[1]) if sys.argv[1] else None))" "${BENCH_DATA:-}")"
[ "$LOSS" = ce ] && python3 - "$OUT" "$RUNS" "$RESULTS" <<'PY'
import csv, shutil, sys
from pathlib import Path
from pcl_viewer.evaluate.benchmark import ROWS
out, runs = Path(sys.argv[1]), Path(sys.argv[2])
slug = {r.name: r.slug for r in ROWS}
try:
    rows = sorted(csv.DictReader(open(sys.argv[3] + "/benchmark.csv")), key=lambda r: -float(r["dsc"]))
except (OSError, KeyError, ValueError) as exc:
    sys.exit(f"no ranking: {exc}")
n = 0
for r in rows:
    w = runs / slug.get(r["method"], "?") / "seed0" / "bundle" / "unet.safetensors"
    if n < 3 and w.is_file():
        shutil.copy(w, out / f"{slug[r['method']]}.safetensors")
        n += 1
        print("kept weights of", r["method"], r["dsc"])
PY
tar czf "$OUT/bench.tgz" "$RESULTS" "$FIGURES" "$OUT/logs" "$RUNS"/cells* \
  $(ls "$RUNS"/*/seed*/{log.jsonl,probe.json,config.json,cf_bundle.txt} \
       "$RUNS"/*/seed*/bundle/card.json 2>/dev/null)
echo "total $(( $(date +%s) - T0 )) s"
exit "$REPORT"
