#!/usr/bin/env bash
# LAION-400M metadata (parquet, columns URL/TEXT) -> 256 px WebDataset shards in img2dataset's layout.
# Resumable: rerun the same command after an interruption; finished shards are skipped.
#   usage: data_prep/laion400m.sh META_DIR OUT_DIR [extra defocus-clip prep options]
#   env:   WORKERS (default: CPU count), THREADS (downloads per worker, default 32)
set -euo pipefail
META=${1:?usage: $0 META_DIR OUT_DIR [options]}
OUT=${2:?usage: $0 META_DIR OUT_DIR [options]}
shift 2
WORKERS=${WORKERS:-$(nproc)}
THREADS=${THREADS:-32}

defocus-clip prep "$META" --output "$OUT" \
    --url-col URL --caption-col TEXT --extra-columns NSFW similarity LICENSE \
    --image-size 256 --resize-mode center_crop --min-image-size 64 --max-aspect-ratio 3 \
    --encode-format jpg --encode-quality 95 --samples-per-shard 10000 \
    --workers "$WORKERS" --threads "$THREADS" --timeout 10 --retries 2 \
    "$@"

defocus-clip prep verify "$OUT" --no-decode
