#!/usr/bin/env bash
# Starts `rlmt-jax train CONFIG key=value ...` on every worker at once, in the background (nohup), with the
# environment multi-host JAX needs; the output goes to ~/rlmt-jax-train.log on each worker.
#
# usage: launch.sh --name NAME --zone ZONE [--project PROJECT] [--env KEY=VALUE]... [--python PYTHON]
#                  [--log FILE] [--dry-run] [--] CONFIG [key=value ...]
#   CONFIG      a YAML file inside the installed source tree (~/rlmt-jax), e.g. configs/grpo_llama31_8b_instruct.yaml
#   --env       one more environment variable for the run (repeatable), e.g. --env LIBTPU_INIT_ARGS=...
#   --python    the Python that runs it, relative to ~/rlmt-jax (default .venv/bin/python: install.sh's virtualenv)
#   --log       the log file on each worker, relative to home (default rlmt-jax-train.log)
#   --dry-run   print the gcloud command instead of running it
# Every worker sets RLMT_MULTIHOST=1, which makes rlmt-jax call jax.distributed.initialize() (the TPU VM's
# metadata tells JAX the coordinator and the process ids). A run still going on a worker stops the launch.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

env_vars=(RLMT_MULTIHOST=1 PYTHONUNBUFFERED=1)
python=.venv/bin/python
log=$REMOTE_LOG
while (($#)); do
  case $1 in
    --env)
      need_value "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $2 is not KEY=VALUE"
      env_vars+=("$2")
      shift 2
      ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --log) need_value "$@"; log=$2; shift 2 ;;
    --) shift; break ;;
    --*) parse_common_option "$@"; shift "$SHIFTED" ;;
    *) break ;;
  esac
done
require_tpu
(($#)) || die "CONFIG is required: launch.sh ... configs/grpo_llama31_8b_instruct.yaml [key=value ...]"
for override in "${@:2}"; do
  # an option after CONFIG (say --dry-run) would otherwise reach train, and the launch would really happen
  [[ $override =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "$override after CONFIG is not key=value (options go before CONFIG)"
done

pid_file=$(remote_path "$REMOTE_PID")
still_running="if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then \
echo \"\$(hostname): a run is still going (pid \$(cat $pid_file)); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi"
no_python="if ! command -v $(quote "$python") >/dev/null; then \
echo \"\$(hostname): no $(quote "$python") in ~/$REMOTE_DIR; run tpu_scripts/install.sh first\" >&2; exit 1; fi"
train=$(quote_all "${env_vars[@]}" nohup "$python" -m rlmt_jax.cli train "$@")
on_workers all "set -e; cd $REMOTE_DIR; $no_python; $still_running; \
$train > $(remote_path "$log") 2>&1 < /dev/null & echo \$! > $pid_file"
if ((!DRY_RUN)); then
  echo "started; follow worker 0 with: tpu_scripts/logs.sh --name $TPU_NAME --zone $TPU_ZONE" >&2
fi
