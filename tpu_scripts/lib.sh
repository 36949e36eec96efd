# shellcheck shell=bash disable=SC2034  # (the variables here are read by the scripts that source this file)
# Shared by the tpu_scripts: the common options, --dry-run, and how a command is printed or run.
# Sourced, never run. Scripts call `parse_common_option "$@"` for options they do not know themselves.

TPU_NAME=${RLMT_TPU_NAME:-}
TPU_ZONE=${RLMT_TPU_ZONE:-}
TPU_PROJECT=${RLMT_TPU_PROJECT:-}
DRY_RUN=0
SHIFTED=0

# The source tree, the log and the pid file on every worker, relative to the worker's home directory.
REMOTE_DIR=rlmt-jax
REMOTE_LOG=rlmt-jax-train.log
REMOTE_PID=rlmt-jax-train.pid

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# Prints the comment block at the top of the calling script (everything after the shebang up to the first
# line that is not a comment), which is its usage text.
usage() {
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;/^shellcheck/d;p;}' "$0"
}

# quote ARG: ARG as one shell word, single-quoted only when it holds characters a shell would act on.
# An option's value is quoted on its own (--command='ls -l'), which reads better and means the same.
quote() {
  local arg=$1
  if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$arg"
  elif [[ $arg =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# quote_all ARGS...: the arguments as one line a shell splits back into the same words.
quote_all() {
  local line="" arg
  for arg in "$@"; do
    line+="${line:+ }$(quote "$arg")"
  done
  printf '%s' "$line"
}

# run CMD ARGS...: runs the command, or with --dry-run prints it (one line, shell-quoted) instead.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# need_value OPTION VALUE...: dies unless OPTION was given a value.
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "$1 needs a value"
  fi
}

# parse_common_option "$@": handles --name, --zone, --project, --dry-run, --help; sets SHIFTED to the
# number of arguments it used. Anything else is an error.
parse_common_option() {
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; SHIFTED=2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; SHIFTED=2 ;;
    --project) need_value "$@"; TPU_PROJECT=$2; SHIFTED=2 ;;
    --dry-run) DRY_RUN=1; SHIFTED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

# require_tpu: dies unless the TPU's name and zone are known (from options or RLMT_TPU_NAME/RLMT_TPU_ZONE).
require_tpu() {
  [[ -n $TPU_NAME ]] || die "--name is required (or set RLMT_TPU_NAME)"
  [[ -n $TPU_ZONE ]] || die "--zone is required (or set RLMT_TPU_ZONE)"
}

# scope_flags: the --zone (and --project) flags every gcloud command gets, one per line for mapfile.
scope_flags() {
  printf '%s\n' "--zone=$TPU_ZONE"
  if [[ -n $TPU_PROJECT ]]; then
    printf '%s\n' "--project=$TPU_PROJECT"
  fi
}

# remote_path FILE: FILE as the worker's shell should read it: relative to the home directory unless absolute.
remote_path() {
  if [[ $1 == /* ]]; then
    quote "$1"
  else
    # shellcheck disable=SC2016  # $HOME is expanded by the worker's shell
    printf '"$HOME"/%s' "$(quote "$1")"
  fi
}

# on_workers WORKER COMMAND: runs the shell COMMAND on the TPU VM's worker WORKER (a number, or all).
on_workers() {
  local scope
  mapfile -t scope < <(scope_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${scope[@]}" "--worker=$1" "--command=$2"
}
