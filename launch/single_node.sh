#!/bin/bash
# One machine, all its GPUs (or GPUS_PER_NODE of them):
#   bash launch/single_node.sh yamls/prune_7b_to_2.7b.yaml run_name=my-run
#   bash launch/single_node.sh --dry-run yamls/...      # print the command only
set -euo pipefail
cd "$(dirname "$0")/.."
args=(single)
if [[ "${1:-}" == "--dry-run" ]]; then args+=(--dry-run); shift; fi
[[ -n "${GPUS_PER_NODE:-}" ]] && args+=(--gpus-per-node "$GPUS_PER_NODE")
exec python -m llmshearing.training.launch "${args[@]}" "$@"
