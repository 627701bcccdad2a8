#!/usr/bin/env bash
# Corrupt copies of one MVTec AD category in every way a user's copy goes wrong and check that
# each run stops with one clear message (exit 2, no record), while odd-but-valid images run.
#   benchmarks/corrupted_copies.sh ../shared/data/mvtec_ad/bottle
# Copies go to a temporary folder (about the category's size at a time), never the repository.
set -uo pipefail
SRC=$(realpath "${1:?usage: $0 <mvtec category folder>}")
CAT=$(basename "$SRC")
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
B="$WORK/root/$CAT"

fresh() { rm -rf "$WORK/root"; mkdir -p "$WORK/root"; cp -r "$SRC" "$B"; }
first() { find "$B/$1" -name '*.png' | sort | head -1; }
check() {  # $1: what was done, $2: expected exit status
  local out="$WORK/out/$RANDOM"
  local log
  log=$(cd "$WORK" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m stad dataset=mvtec \
    dataset.root="$WORK/root" dataset.category="$CAT" backbone=tf_efficientnet_lite0 \
    backbone.weights=package trainer=smoke hydra.run.dir="$out" 2>&1)
  local status=$?
  local records
  records=$(find "$out" -name record.json 2>/dev/null | wc -l)
  local verdict=ok
  [[ $status -eq $2 ]] || verdict=UNEXPECTED
  [[ $2 -ne 0 && $records -ne 0 ]] && verdict=UNEXPECTED
  echo "[$verdict] $1: exit $status, $records record(s)"
  echo "$log" | grep -E "^stad: error|Traceback" | cut -c1-300 | sed 's/^/    /'
}

fresh; f=$(first train/good); head -c 20000 "$f" > "$WORK/t" && mv "$WORK/t" "$f"
check "truncated PNG in train/good" 2
fresh; : > "$(first test/good)"; check "zero-byte PNG in test/good" 2
fresh; rm "$(first ground_truth)"; check "anomalous image without its mask" 2
fresh; m=$(first ground_truth); cp "$m" "$(dirname "$m")/999_mask.png"; check "mask without an image" 2
fresh; m=$(first ground_truth); "$PY" -c "from PIL import Image; import sys; \
Image.open(sys.argv[1]).resize((100, 100)).save(sys.argv[1])" "$m"; check "mask of another size" 2
fresh; rm "$B"/train/good/*.png; check "empty train/good" 2
fresh; echo "not an image" > "$(first test/good)"; check "text file named .png" 2
fresh; "$PY" -c "from PIL import Image; import sys; \
Image.open(sys.argv[1]).convert('RGBA').save(sys.argv[1]); \
Image.open(sys.argv[2]).convert('L').save(sys.argv[2])" "$(first test/good)" "$(first train/good)"
check "RGBA and greyscale images (valid: must run)" 0
