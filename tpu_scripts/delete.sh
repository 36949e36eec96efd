#!/usr/bin/env bash
# Deletes the TPU VM (or with --queued the queued resource and its node). Nothing on its disks is kept.
#
# usage: delete.sh --name NAME --zone ZONE [--project PROJECT] [--queued] [--dry-run]
#   --queued    NAME is a queued resource (create.sh --queued)
#   --dry-run   print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

queued=0
while (($#)); do
  case $1 in
    --queued) queued=1; shift ;;
    *) parse_common_option "$@"; shift "$SHIFTED" ;;
  esac
done
require_tpu
mapfile -t scope < <(scope_flags)
if ((queued)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${scope[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${scope[@]}" --quiet
fi
