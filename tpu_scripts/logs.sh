#!/usr/bin/env bash
# Streams the training log of one worker (worker 0 by default: the process that logs metrics).
#
# usage: logs.sh --name NAME --zone ZONE [--project PROJECT] [--worker N] [--lines N] [--log FILE] [--dry-run]
#   --worker    which worker's log (default 0)
#   --lines     how many past lines to show first (default 100)
#   --log       the log file on the worker, relative to home (default rlmt-jax-train.log)
#   --dry-run   print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

worker=0
lines=100
log=$REMOTE_LOG
while (($#)); do
  case $1 in
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --lines) need_value "$@"; lines=$2; shift 2 ;;
    --log) need_value "$@"; log=$2; shift 2 ;;
    *) parse_common_option "$@"; shift "$SHIFTED" ;;
  esac
done
require_tpu
[[ $worker =~ ^[0-9]+$ ]] || die "--worker $worker is not a worker number"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines $lines is not a number"
on_workers "$worker" "tail -n $lines -F $(remote_path "$log")"
