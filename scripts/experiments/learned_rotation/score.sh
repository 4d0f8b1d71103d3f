#!/bin/bash
# Quantize a rotated folder (learn.py --out) with cdq's preset solver and score it as the peer table
# does: scripts/experiments/learned_rotation/score.sh FOLDER BITS [EXTRA cdq quantize flags...]
# (run from the repository root; ../shared beside it; one thread, as the table's rows).
set -euo pipefail
folder=$1 bits=$2
shift 2
out=${folder}-cdq-w${bits}
text=../shared/data/text
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
/usr/bin/time -f "quantize CPU s %U + %S, peak %M kB" .venv/bin/cdq quantize "$folder" --method cdq \
    --bits "$bits" --sym --calib "$text/c4-sample.jsonl" --nsamples 32 --seqlen 512 --seed 0 \
    --output "$out" --overwrite --quiet "$@"
for data in wikitext2-raw-test ptb-valid ptb-test; do
    printf '%s ' "$data"
    .venv/bin/cdq eval "$out" --data "$text/$data.txt" --seqlen 512 --max-windows 40 --dtype float32 --json \
        | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])"
done
