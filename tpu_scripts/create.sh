#!/usr/bin/env bash
# Creates a Cloud TPU VM, or with --queued a queued resource (the way to get v5p/v5e/v6e capacity).
#
# usage: create.sh --name NAME --zone ZONE --type TYPE [--version RUNTIME] [--project PROJECT]
#                  [--queued] [--spot] [--dry-run]
#   --type      accelerator type: v4-32, v5p-64, v5litepod-64, v6e-64, ...
#   --version   TPU runtime (software) version; default by type: v4 tpu-ubuntu2204-base,
#               v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
#   --queued    request a queued resource named NAME whose node is also named NAME
#   --spot      spot (preemptible) capacity
#   --dry-run   print the gcloud command instead of running it
# NAME, ZONE and PROJECT default to $RLMT_TPU_NAME, $RLMT_TPU_ZONE and $RLMT_TPU_PROJECT.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# default_runtime TYPE: the runtime version Google documents for the TPU generation of TYPE.
default_runtime() {
  case $1 in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) die "no default runtime version for --type $1: pass --version" ;;
  esac
}

tpu_type=""
runtime=""
queued=0
spot=0
while (($#)); do
  case $1 in
    --type) need_value "$@"; tpu_type=$2; shift 2 ;;
    --version) need_value "$@"; runtime=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    *) parse_common_option "$@"; shift "$SHIFTED" ;;
  esac
done
require_tpu
[[ -n $tpu_type ]] || die "--type is required (for example v5p-64)"
if [[ -z $runtime ]]; then
  runtime=$(default_runtime "$tpu_type")
fi
mapfile -t scope < <(scope_flags)
extra=()
if ((spot)); then
  extra+=(--spot)
fi

if ((queued)); then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${scope[@]}" \
    --accelerator-type="$tpu_type" --runtime-version="$runtime" "${extra[@]}"
  if ((!DRY_RUN)); then
    echo "queued; watch it with: gcloud compute tpus queued-resources describe $TPU_NAME ${scope[*]}" >&2
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${scope[@]}" \
    --accelerator-type="$tpu_type" --version="$runtime" "${extra[@]}"
fi
