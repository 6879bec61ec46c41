#!/usr/bin/env bash
# A folder of images with a CSV of captions (columns: url = path relative to the CSV, caption) -> shards.
#   usage: data_prep/local_folder.sh CAPTIONS.csv OUT_DIR [extra defocus-clip prep options]
set -euo pipefail
CSV=${1:?usage: $0 CAPTIONS.csv OUT_DIR [options]}
OUT=${2:?usage: $0 CAPTIONS.csv OUT_DIR [options]}
shift 2
defocus-clip prep "$CSV" --output "$OUT" --image-size 256 --resize-mode center_crop \
    --samples-per-shard 1000 --workers "${WORKERS:-$(nproc)}" --dedupe "$@"
defocus-clip prep verify "$OUT"
