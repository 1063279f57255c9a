#!/usr/bin/env bash
# Transfer benchmark (docs/benchmarks.md, "Transfer"): a network pretrained on one dataset, imported into a
# project on another, against adapting it, training from scratch for the same steps, and raw pixels.
#   bash bench/transfer.sh NETWORK_DIR IMAGE_FOLDER STEPS [extra --set pairs...]
# NETWORK_DIR: a finished run's outputs/pretrain/network; IMAGE_FOLDER: e.g. from export_image_folder.py digits.
# Runs the arms one after another in this checkout (each rewrites params.yaml) and prints each arm's metrics.
set -euo pipefail
network="$1"; images="$2"; steps="$3"; shift 3
common=(--dataset imagefolder --set "data.source=$images" "$@")
summary() {
  python - "$1" <<'PY'
import json, sys
probe, pretrain = json.load(open("metrics/probe.json")), json.load(open("metrics/pretrain.json"))
efficiency = json.load(open("metrics/evaluate.json"))["label_efficiency"]
print(json.dumps({"arm": sys.argv[1], "test_acc": probe["test_acc"], "raw_pixels_test_acc": probe["raw_pixels_test_acc"],
                  "label_efficiency": efficiency, "steps": pretrain["steps"], "train_wall_s": pretrain["train_wall_s"]}))
PY
}
ddae run "${common[@]}" --set pretrain.init.mode=import --set "pretrain.init.source=$network" && summary imported
ddae run "${common[@]}" --set pretrain.init.mode=adapt --set "pretrain.init.source=$network" \
  --set "pretrain.train.steps=$steps" && summary adapted
ddae run "${common[@]}" --set pretrain.init.mode=scratch --set "pretrain.init.source=\"\"" \
  --set "pretrain.train.steps=$steps" && summary scratch
