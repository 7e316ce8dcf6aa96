#!/usr/bin/env bash
# Train the Bible es→en model on a GPU machine: the recipe's exact hyperparameters plus --fp16,
# then export model.pt (the same export function as the CPU recipe) and the train log into
# $OUT/bible_model/. Run from anywhere in the repository:
#
#   MINUTES=3 bash examples/bible/train_on_device.sh [more recipe.py options, e.g. --max-epoch 4]
#
# Needs: python3 that imports fairseq 0.12 and torch with CUDA (PYTHONPATH is fine; fairseq's
# console scripts are not needed), and the data-bin made on a CPU machine by
#   python examples/bible/recipe.py --steps spm,binarize --data-bin .bible_carry
# carried along as .bible_carry (or named by DATA_BIN).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
MINUTES=${MINUTES:-3}              # training-time budget (fairseq --stop-time-hours); the epoch cap may stop it first
DATA_BIN=${DATA_BIN:-.bible_carry}
WORKDIR=${WORKDIR:-/tmp/bible}     # checkpoints with optimizer state (~90 MB each) stay here
DEST=${OUT:?set OUT to the folder that receives bible_model/}/bible_model
export PYTHONUNBUFFERED=1

[ -f "$DATA_BIN/train.es-en.es.bin" ] || { echo "no data-bin in $DATA_BIN (see the header of $0)" >&2; exit 2; }
"$PYTHON" -c 'import fairseq, torch; assert torch.cuda.is_available(), "no CUDA device"
print("fairseq", fairseq.__version__, "| torch", torch.__version__, "|", torch.cuda.get_device_name(0))'

started=$(date +%s)
"$PYTHON" examples/bible/recipe.py --steps train,export --device cuda --threads 4 \
    --data-bin "$DATA_BIN" --workdir "$WORKDIR" --model-dir "$DEST" --minutes "$MINUTES" "$@"
cp "$WORKDIR/checkpoints/train.log" "$DEST/train.log"

echo "== validation per epoch (valid subset, 1,063 verses) =="
grep "valid on 'valid' subset" "$DEST/train.log" | sed 's/.*| epoch/epoch/'
grep -E "done training|Stopping training" "$DEST/train.log" | sed 's/.*| //' || true
echo "== $(( $(date +%s) - started ))s for training and export; files in $DEST:"
ls -l "$DEST"
