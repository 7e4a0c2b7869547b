#!/usr/bin/env bash
# The GPU benchmark, run once on a lent GPU machine from the repository root:
#     OUT=/some/dir bash benchmarks/gpu.sh
# No installation: PYTHONPATH=. (the machine has torch, torchvision, numpy, pandas, pyarrow, tqdm,
# pillow, psutil; cnnvis_pipeline.bench imports nothing else). Every step writes its log to
# $OUT as it goes, so a run cut short still leaves what it measured. Environment:
#   N        images of the full-scale run (default 63305, broden1_224's count; the script falls back
#            to 20000 when the small run projects generation + preparation above GEN_LIMIT s)
#   BUDGET   seconds the whole script may take (default 470: under 8 minutes with start-up);
#            later steps get what is left
#   SMALL    images of the first, insurance run (default 8000; 0 skips it and the projection)
#   VERIFY   images on which the layer3 + layer4 run also checks device tally == CPU tally
#            from the same activations (default 2048; 0 skips it)
#   BS2      batch size of an extra layer4 run at the end, if time is left (default 512; 0 skips)
#   R50      1 (default): a ResNet-50 layer4 run at N images (its peak GPU memory); 0 skips it
#   CPU_N    images of the CPU comparison run on the same machine (default 500; 0 skips it)
#   WORKFLOW 1 (default): the full-scale layer4 run also runs the dissection through the real
#            Snakemake workflow (bench --workflow; needs snakemake, pyyaml, jsonschema, matplotlib,
#            seaborn: skipped with a message where they are missing) and the small run times the
#            first run's validation + preparation (--first-run: all cores, and 1); 0 skips both
#   DEV, SIZE  the device of the GPU steps (default cuda) and image size (default 224): DEV=cpu
#            SIZE=32 N=1200 SMALL=1000 CPU_N=16 rehearses the script on a machine without a GPU
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PY:-$(command -v python3 || command -v python)}
N=${N:-63305}
SMALL=${SMALL:-8000}
CPU_N=${CPU_N:-500}
VERIFY=${VERIFY:-2048}
BS2=${BS2:-512}
BUDGET=${BUDGET:-470}
R50=${R50:-1}
GEN_LIMIT=${GEN_LIMIT:-230}
DEV=${DEV:-cuda}
SIZE=${SIZE:-224}
WORKFLOW=${WORKFLOW:-1}
START=$(date +%s)
DEADLINE=$((START + BUDGET))

left() { echo $((DEADLINE - $(date +%s))); }
say() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu.sh.log"; }

# Dataset cache: RAM-backed /dev/shm when it has room (about 40 GB at the peak for 63,305 images).
CACHE=${CACHE:-}
if [ -z "$CACHE" ]; then
  shm_free=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  if [ -n "$shm_free" ] && [ "$shm_free" -ge 45 ] 2>/dev/null; then
    CACHE=/dev/shm/cnnvis-bench
  else
    CACHE=benchmarks/cache
  fi
fi
say "cache $CACHE, budget ${BUDGET}s"

{
  date -Is; uname -a; nproc; free -g; df -h . /dev/shm 2>/dev/null
  nvidia-smi 2>&1 | head -20
  $PY -c "import sys, torch, torchvision, numpy; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('torchvision', torchvision.__version__, 'numpy', numpy.__version__)"
  $PY -c "import sys, cnnvis_pipeline.bench; bad = sorted({m.split('.')[0] for m in sys.modules} & {'pooch', 'snakemake', 'yaml', 'matplotlib'}); print('bench imports:', bad or 'ok')"
} > "$OUT/machine.txt" 2>&1
say "machine: $(grep -m1 -o 'NVIDIA [^|]*' "$OUT/machine.txt" | head -1)"

# The workflow comparison needs the workflow's own dependencies on this machine.
WF_ARGS=()
FIRST_ARGS=()
if [ "$WORKFLOW" = 1 ]; then
  FIRST_ARGS=(--first-run)
  if $PY -c "import snakemake, yaml, jsonschema, matplotlib, seaborn" >> "$OUT/machine.txt" 2>&1; then
    WF_ARGS=(--workflow --cores "$(nproc)")
  else
    say "skip --workflow: snakemake/pyyaml/jsonschema/matplotlib/seaborn not importable here"
  fi
fi

bench() {  # name, seconds limit, bench arguments...
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then say "skip $name: ${limit}s left"; return 1; fi
  say "start $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" $PY -m cnnvis_pipeline.bench --cache "$CACHE" \
    --size "$SIZE" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/$name.log" | grep '^{' >> "$OUT/results.jsonl"
  say "end $name rc=$rc: $(grep -E '^(forward|dissect|whole|in-process|workflow|first run|prepare /)' "$OUT/$name.log" | tr '\n' ' ')"
  return $rc
}

# 1. Insurance: a small run (all generation workers busy), layer4.
proj=0
if [ "$SMALL" -gt 0 ]; then
  small_limit=$(( $(left) - 60 )); [ "$small_limit" -gt 150 ] && small_limit=150
  bench "${DEV}_${SMALL}_layer4" "$small_limit" --images "$SMALL" --device "$DEV" --layers layer4 \
    "${FIRST_ARGS[@]}"

  # Project generation + preparation of N images from the small run; fall back to 20,000 if slow.
  proj=$($PY - "$OUT/${DEV}_${SMALL}_layer4.log" "$SMALL" "$N" <<'PYEOF'
import json, sys
try:
    line = open(sys.argv[1]).read().strip().splitlines()[-1]
    d = json.loads(line)
    print(int((d["gen_s"] + d["prep_s"]) * int(sys.argv[3]) / int(sys.argv[2]) * 1.15 + 1))
except Exception:
    print(999999)
PYEOF
)
  say "projected generation + preparation of $N images: ${proj}s (limit ${GEN_LIMIT}s)"
  if [ "$proj" -gt "$GEN_LIMIT" ]; then
    N=20000
    say "falling back to N=$N"
  fi
  rm -rf "$CACHE"/broden-big-*-n"$SMALL"-* 2>/dev/null
fi

# 2. Full scale: layer4 (the headline; with the workflow beside it), then layer3 + layer4.
bench "${DEV}_${N}_layer4" "$(( $(left) - 100 ))" --images "$N" --device "$DEV" --layers layer4 \
  "${WF_ARGS[@]}"
bench "${DEV}_${N}_layer3_layer4" "$(( $(left) - 130 ))" --images "$N" --device "$DEV" \
  --layers layer3 layer4 --verify "$VERIFY"
# ResNet-50 layer4 (2,048 units, statistics on): its peak GPU and resident memory.
if [ "$R50" = 1 ]; then
  bench "${DEV}_${N}_resnet50_layer4" "$(( $(left) - 70 ))" --images "$N" --device "$DEV" \
    --arch resnet50 --layers layer4 --no-forward
fi
if [ "$BS2" -gt 0 ]; then
  bench "${DEV}_${N}_layer4_bs${BS2}" "$(( $(left) - 60 ))" --images "$N" --device "$DEV" \
    --layers layer4 --batch-size "$BS2"
fi
rm -rf "$CACHE"/broden-big-*-n"$N"-* 2>/dev/null

# 3. The CPU path on the same machine, for comparison (small).
if [ "$CPU_N" -gt 0 ]; then
  bench "cpu_${CPU_N}_layer3_layer4" "$(( $(left) - 5 ))" --images "$CPU_N" --device cpu \
    --layers layer3 layer4
fi
rm -rf /dev/shm/cnnvis-bench 2>/dev/null
say "done"
