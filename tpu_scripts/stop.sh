#!/usr/bin/env bash
# Stops the run that launch.sh started, on every worker (by the pid it wrote); the TPU VM stays.
#
# usage: stop.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]
#   --dry-run   print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while (($#)); do
  parse_common_option "$@"
  shift "$SHIFTED"
done
require_tpu
pid_file=$(remote_path "$REMOTE_PID")
on_workers all "if [ -f $pid_file ]; then kill \"\$(cat $pid_file)\" 2>/dev/null || true; rm -f $pid_file; fi"
