#!/usr/bin/env bash
# Heads that draft (docs/drafting.md), on one GPU in ~14 minutes: self-distillation data -> heads-only
# training (the base frozen) -> which tree of drafts to verify (calibrated on held-out training
# prompts) -> full-HumanEval self-speculative vs plain greedy decoding, fp32, batch 1 and 8, one
# JSON with every number.
#
#   bash tools/draft_heads.sh BASE_MODEL                   # a local HF dir of SmolLM2-135M-Instruct
#   HEAD_TARGET=head0 bash tools/draft_heads.sh BASE_MODEL  # KL to head 0 instead of hard tokens
#
# Writes $RUN/distill.jsonl (+ _eval), $RUN/{data,train,calibrate,measure}.log, out/draft_heads*/final
# (the checkpoint: base bit for bit BASE_MODEL, trained heads), $RUN/tree.json (the calibrated
# drafts) and $RUN/measure.json (the numbers, with each phase's seconds).
set -euo pipefail
BASE=${1:?usage: bash tools/draft_heads.sh BASE_MODEL (a local HF dir)}
RUN=${RUN:-out/draft}
DATA=${DATA:-.gpu/data}                   # stdlib_train.jsonl (data.source=stdlib exported), if there
STDLIB=${STDLIB:-$DATA/stdlib_train.jsonl}
MBPP=${MBPP:-data/mbpp.jsonl}
SAMPLED=${SAMPLED:-3}                     # sampled continuations per prompt (plus one greedy)
STEPS=${STEPS:-800}
HEAD_TARGET=${HEAD_TARGET:-tokens}
BATCHES=${BATCHES:-1,8}
TREES=${TREES:-chain,3x2x1,$RUN/tree.json:10,$RUN/tree.json:16,$RUN/tree.json:32}  # each measured: chain,
                                          # widths like 3x2x1, the calibrated tree's first N drafts
PICK_BLAS=${PICK_BLAS:-True}              # matmuls of 2-256 rows by the fastest cuBLAS path per shape (linear_pick.py)
PARALLEL=${PARALLEL:-True}                # the last block and the heads as one batched block (parallel_heads.py)
PY=${PY:-python}
CKPT=out/draft_heads_$HEAD_TARGET
mkdir -p "$RUN"
export TOKENIZERS_PARALLELISM=false
now() { date +%s.%N; }
# Each phase logs to $RUN/<phase>.log; its last lines (progress bars dropped) are printed after it.
phase() {  # phase NAME COMMAND...
    local name=$1; shift
    local t=$(now)
    if ! "$@" > "$RUN/$name.log" 2>&1; then
        echo "== $name FAILED"; tr '\r' '\n' < "$RUN/$name.log" | grep -v '%|' | tail -40; exit 1
    fi
    echo "== $name: $($PY -c "print(round($(now) - $t, 1))") s"; tr '\r' '\n' < "$RUN/$name.log" | grep -v '%|' | tail -${TAIL:-12}
}
t0=$(now)
[ -f "$STDLIB" ] || STDLIB=""             # no export: scan this interpreter's standard library
phase data $PY -m tools.speculate "$BASE" --stage=data --stdlib_path="$STDLIB" --mbpp_path="$MBPP" \
    --sampled="$SAMPLED" --max_new_tokens=256 --batch_size=512 --out="$RUN/distill.jsonl"
t1=$(now)
phase train $PY train_rho1.py configs/smol_draft_heads.yaml --model.policy="$BASE" \
    --model.head_target="$HEAD_TARGET" --data.path="$RUN/distill.jsonl" --data.eval_path="$RUN/distill_eval.jsonl" \
    --train.max_steps="$STEPS" --train.heads_only_steps="$STEPS" --train.out_dir="$CKPT" --train.log_every=50 --overwrite
t2=$(now)
TAIL=4 phase calibrate $PY -m tools.speculate "$CKPT/final" --stage=calibrate --calib_path="$RUN/distill_eval.jsonl" \
    --pick_blas="$PICK_BLAS" --parallel_heads="$PARALLEL" --max_new_tokens=256 --out="$RUN/tree.json"
t3=$(now)
TAIL=20 phase measure $PY -m tools.speculate "$CKPT/final" --stage=measure --base="$BASE" --batch_sizes="$BATCHES" \
    --trees="$TREES" --pick_blas="$PICK_BLAS" --parallel_heads="$PARALLEL" --max_new_tokens=256 --out="$RUN/measure.json"
t4=$(now)
$PY - "$RUN/measure.json" "$t0" "$t1" "$t2" "$t3" "$t4" "$HEAD_TARGET" "$STEPS" "$SAMPLED" <<'PY'
import json, sys
path, t0, t1, t2, t3, t4 = sys.argv[1], *map(float, sys.argv[2:7])
r = json.load(open(path))
r["phase_seconds"] = {"data": round(t1 - t0, 1), "train": round(t2 - t1, 1), "calibrate": round(t3 - t2, 1),
                      "measure": round(t4 - t3, 1), "total": round(t4 - t0, 1)}
r["training"] = {"config": "configs/smol_draft_heads.yaml", "head_target": sys.argv[7], "steps": int(sys.argv[8]),
                 "sampled_per_prompt": int(sys.argv[9])}
json.dump(r, open(path, "w"), indent=2)
print("phases (s):", r["phase_seconds"])
PY
