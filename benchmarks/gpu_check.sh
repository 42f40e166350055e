#!/usr/bin/env bash
# The GPU checks (issues 13 and 17) as one prepared command, so a session lent an NVIDIA GPU spends its
# device time running them, not installing. On the project machine, once:
#   mkdir -p .gpu && cp tinyshakespeare.txt .gpu/             (.gpu/ and gpu-check/ are git-ignored)
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu tomli-w
# then on the GPU machine (the `device` tool; carry [".gpu"]), in two calls of about 5 minutes each so that
# a failed one can be rerun inside the session's 15 minutes of device time:
#   GPU_CHECK_STEPS="tests train" bash benchmarks/gpu_check.sh        (timeout_s 540)
#   GPU_CHECK_STEPS=nanogpt bash benchmarks/gpu_check.sh              (timeout_s 400)
# It uses the machine's own torch and packages (nothing can be fetched there) and adds nima-edge and the
# wheels in .gpu. What it writes to $OUT (default gpu-check/): env.txt, one log per step, metrics.jsonl and
# eval.json of the nima-10m GPU recipe, nanogpt.log, and summary.txt (each step's exit status and time).
#   tests    tests/test_cuda.py (bf16/fp16 training, CUDA RNG, resume) and tests/test_tensorrt.py
#   train    nima-10m on train/recipes/gpu/nima-10m.toml (nanoGPT's GPU recipe at nima-10m's context),
#            capped at GPU_CHECK_TRAIN_SECONDS, then `nima-edge eval` (bits/char, BLEU, chrF)
#   nanogpt  the real nanoGPT's own GPU shakespeare_char recipe on the same split (compile off, as ours),
#            stopped at the same wall time (its log has val loss every 250 iterations)
# GPU_CHECK_STEPS picks steps (default all three). Each step has its own time limit, so one hang cannot
# spend the call.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check}
PY=$(command -v "${PYTHON:-python3}")
[[ $PY == /* ]] || PY=$REPO/$PY  # absolute: the nanogpt step runs from its own folder
STEPS=${GPU_CHECK_STEPS:-tests train nanogpt}
TRAIN_SECONDS=${GPU_CHECK_TRAIN_SECONDS:-180}
NANOGPT_ITERS=${GPU_CHECK_NANOGPT_ITERS:-5000}
read -ra NANOGPT_EXTRA <<< "${GPU_CHECK_NANOGPT_ARGS:-}"  # e.g. "--device=cpu --dtype=float32" for a CPU rehearsal
CORPUS=${GPU_CHECK_CORPUS:-$REPO/.gpu/tinyshakespeare.txt}
SITE=${GPU_CHECK_SITE:-/tmp/nima-site}
WORK=${GPU_CHECK_WORK:-/tmp/nima-gpu-work}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)  # absolute, like PY

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  return $rc
}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
                                     'available', torch.cuda.is_available())"
  "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -n 1
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# nima-edge without its pinned dependencies (the machine's torch stays), plus the carried wheels
step install 180 "$PY" -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target "$SITE" "$REPO" \
  $(ls "$REPO"/.gpu/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

for s in $STEPS; do
  case $s in
    tests)
      step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_tensorrt.py ;;
    train)
      if [[ ! -f $CORPUS ]]; then echo "train: no corpus at $CORPUS (copy tinyshakespeare.txt to .gpu/)"; continue; fi
      step data 120 "$PY" -m nima_edge data prepare --corpus "$CORPUS" --out "$WORK/data-char" || continue
      step train $(( TRAIN_SECONDS + 120 )) "$PY" -m nima_edge train --recipe train/recipes/gpu/nima-10m.toml \
        --data "$WORK/data-char" --out "$WORK/nima-10m" --minutes "$(awk "BEGIN { print $TRAIN_SECONDS / 60 }")"
      cp "$WORK/nima-10m/metrics.jsonl" "$OUT/" 2>/dev/null
      step eval 240 "$PY" -m nima_edge eval "$WORK/nima-10m" --data "$WORK/data-char" --json "$OUT/eval.json" ;;
    nanogpt)
      if [[ ! -f $CORPUS ]]; then echo "nanogpt: no corpus at $CORPUS"; continue; fi
      # nanoGPT's files and bins of the same 90/10 split (the training benchmark's helper), then its own
      # train.py with its GPU recipe as published; only compile is off, as our trainer does not compile
      step nanogpt-data 120 "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks/experiments')
from pathlib import Path
from nima_edge.data import TokenData, prepare
from train_shakespeare import nanogpt_workdir
prepare('$CORPUS', Path('$WORK/data-char'), 'char')
nanogpt_workdir(Path('$WORK/nanogpt'), TokenData(Path('$WORK/data-char')))" || continue
      # the same wall time as ours: `timeout` ends it there (exit 124 = the budget was reached)
      (cd "$WORK/nanogpt" && step nanogpt "$TRAIN_SECONDS" "$PY" train.py config/train_shakespeare_char.py \
        --compile=False --max_iters="$NANOGPT_ITERS" --lr_decay_iters="$NANOGPT_ITERS" --out_dir=out "${NANOGPT_EXTRA[@]}") ;;
    *) echo "unknown step $s (tests, train, nanogpt)" ;;
  esac
done
cat "$OUT/summary.txt"
