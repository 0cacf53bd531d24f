#!/usr/bin/env bash
# GPU check: everything that needs a GPU, in one script, under 8 minutes on one GPU (each step has its own
# time limit, 480 s in all; not yet run on a GPU: no device was lent to issue 21). Run from the repo root:
#
#     bash bench/gpu_check.sh                 # on a machine with one CUDA GPU and the project's venv active
#     bash bench/gpu_check.sh --dry_run       # anywhere: list the steps and their commands, run nothing
#     bash bench/gpu_check.sh --out=/tmp/gc   # work folder (default /tmp/nanostate_gpu_check)
#
# Steps (each logged to OUT/logs/<step>.log; one summary table at the end, exit 1 if any step failed):
#   tests      kernel and model tests on CUDA (compiled Triton, not the interpreter): test_attention,
#              test_energy, test_st, test_arc
#   attention  bench/bench_attention.py: the fused attention kernel vs SDPA (flash) and the reference
#   energy     bench/bench_energy.py: the fused energy kernel vs the torch reference and geomloss (if importable)
#   train      a `default` preset ST run (state.yaml sizes) on a synthetic 2,000-gene set: cells/s and MFU
#   fsdp       a 1-GPU torchrun FSDP2 run, stopped at step 20 and resumed to 40 (sharded DCP checkpoint)
#   import     an arc-state run imported (python -m state.convert) and simulated on CUDA: predictions
#              against arc-state's own `state tx infer` output recorded in tests/fixtures/arc
set -u
OUT=/tmp/nanostate_gpu_check
DRY=0
for a in "$@"; do
  case "$a" in
    --dry_run|--dry_run=1|--dry_run=True) DRY=1 ;;
    --out=*) OUT="${a#--out=}" ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown option $a (--dry_run, --out=DIR, --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
D="$OUT/data"
FIX=tests/fixtures/arc
declare -a NAMES LIMITS CMDS FIGS
add() { NAMES+=("$1"); LIMITS+=("$2"); CMDS+=("$3"); FIGS+=("$4"); }

add tests 120 "env -u TRITON_INTERPRET $PY -m pytest -q -x tests/test_attention.py tests/test_energy.py tests/test_st.py tests/test_arc.py" \
    "grep -E '[0-9]+ passed' | tail -1"
add attention 60 "$PY bench/bench_attention.py --reps 20" \
    "grep -iE 'triton|sdpa' | tail -4"
add energy 60 "$PY bench/bench_energy.py --reps 20" \
    "grep -iE 'triton|geomloss|ref' | tail -4"
add train 110 "$PY -m state.synth $D/synth.h5ad --n_cells=20000 --n_genes=2000 --n_perts=50 --n_contexts=2 --seed=0 \
&& $PY -m state.data prepare $D/synth.h5ad $D/prep \
&& $PY -m state.splits make --data=$D/prep --task=fewshot --context=\$($PY -c \"import json;print(json.load(open('$D/prep/index.json'))['context_names'][0])\") --out=$D/split.json \
&& $PY train.py --data=$D/prep --split=$D/split.json --preset=default --max_steps=60 --log_every=10 --val_every=0 --ckpt_every=1000 --out=$OUT/default" \
    "grep -E 'mfu' | tail -1"
add fsdp 80 "torchrun --standalone --nproc_per_node=1 train.py --data=$D/prep --split=$D/split.json --preset=tiny --max_steps=20 --ckpt_every=10 --val_every=0 --out=$OUT/fsdp \
&& torchrun --standalone --nproc_per_node=1 train.py --data=$D/prep --split=$D/split.json --preset=tiny --max_steps=40 --ckpt_every=10 --val_every=0 --out=$OUT/fsdp --resume" \
    "grep -E '^resumed|^done' | tail -2 | tr '\n' ' '"
add import 50 "$PY -m state.convert --arc_run=$FIX/emb_dec --out=$OUT/arc_emb_dec \
&& $PY predict.py simulate --run=$OUT/arc_emb_dec --adata=$FIX/emb_dec/infer_in.h5ad --perts=STAT1,JAK2,non-targeting --n_cells=10 --device=cuda --out=$OUT/arc_screen.h5ad \
&& $PY -c \"
import numpy as np
from state.h5ad import H5AD
with H5AD('$FIX/emb_dec/infer_out.h5ad') as f:
    lab = np.asarray(f.column('target_gene')).astype(str); g = list(f.var_names()); A = f.matrix('obsm/X_hvg').rows(np.arange(f.n_obs))
with H5AD('$OUT/arc_screen.h5ad') as f:
    p = np.asarray(f.column('is_predicted')).astype(bool); l2 = np.asarray(f.column('target_gene')).astype(str)
    X = f.matrix('X').rows(np.arange(f.n_obs)); cols = [g.index(x) for x in f.var_names()]
d = max(np.abs(X[p & (l2 == q)][:, None] - A[lab == q][:, cols][None]).max() for q in ('STAT1', 'JAK2', 'non-targeting'))
print(f'imported arc-state model on CUDA: max |diff| to state tx infer {d:.2e}'); assert d < 1e-3, d
\"" \
    "grep -E 'max \|diff\|' | tail -1"

if [ "$DRY" = 1 ]; then
  total=0
  echo "bench/gpu_check.sh --dry_run: would run, in $OUT (logs in $OUT/logs):"
  for i in "${!NAMES[@]}"; do
    total=$((total + LIMITS[i]))
    printf '\n[%s] (limit %ss)\n  %s\n' "${NAMES[i]}" "${LIMITS[i]}" "${CMDS[i]}"
  done
  printf '\n%s steps, time limits %ss in all (<= 480 s)\n' "${#NAMES[@]}" "$total"
  exit 0
fi

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "bench/gpu_check.sh: no CUDA GPU visible to $PY; on a CPU use --dry_run" >&2; exit 2; }
mkdir -p "$OUT/logs" "$D"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
declare -a STATUS SECS FIG
fail=0
for i in "${!NAMES[@]}"; do
  log="$OUT/logs/${NAMES[i]}.log"
  echo "== ${NAMES[i]} (limit ${LIMITS[i]}s)"
  t0=$(date +%s)
  timeout "${LIMITS[i]}" bash -c "${CMDS[i]}" > "$log" 2>&1
  rc=$?
  SECS[i]=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then STATUS[i]=ok; elif [ $rc = 124 ]; then STATUS[i]=TIMEOUT; fail=1; else STATUS[i]="FAIL($rc)"; fail=1; fi
  FIG[i]=$(eval "${FIGS[i]}" < "$log" | tr -s ' ' | cut -c1-110)
  [ "${STATUS[i]}" != ok ] && tail -5 "$log" | sed 's/^/   | /'
done
printf '\n%-10s %-10s %6s  %s\n' step status secs "key figure (full output: $OUT/logs/<step>.log)"
for i in "${!NAMES[@]}"; do
  printf '%-10s %-10s %6s  %s\n' "${NAMES[i]}" "${STATUS[i]}" "${SECS[i]}" "${FIG[i]}"
done
exit $fail
