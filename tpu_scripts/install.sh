#!/usr/bin/env bash
# Installs rlmt-jax with jax[tpu] on every worker of a TPU VM, into ~/rlmt-jax on each.
#
# usage: install.sh --name NAME --zone ZONE [--project PROJECT]
#                   [--source DIR | --git URL [--ref REF]] [--python PYTHON] [--dry-run]
#   --source    copy this local source tree (default: the checkout these scripts are in);
#               .git, runs/ and build leftovers stay behind
#   --git       clone this repository on every worker instead (--ref: a branch or tag)
#   --python    the workers' Python (default python3); a venv's python works too
#   --dry-run   print the commands instead of running them
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
git_url=""
git_ref=""
python=python3
while (($#)); do
  case $1 in
    --source) need_value "$@"; source_dir=$2; shift 2 ;;
    --git) need_value "$@"; git_url=$2; shift 2 ;;
    --ref) need_value "$@"; git_ref=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    *) parse_common_option "$@"; shift "$SHIFTED" ;;
  esac
done
require_tpu
[[ -z $git_ref || -n $git_url ]] || die "--ref needs --git"
mapfile -t scope < <(scope_flags)

pip_install="$(quote "$python") -m pip install --upgrade pip && $(quote "$python") -m pip install -e \".[tpu]\""
if [[ -n $git_url ]]; then
  clone=(git clone --depth=1)
  if [[ -n $git_ref ]]; then
    clone+=("--branch=$git_ref")
  fi
  clone+=("$git_url" "$REMOTE_DIR")
  on_workers all "rm -rf $REMOTE_DIR && $(quote_all "${clone[@]}") && cd $REMOTE_DIR && $pip_install"
else
  [[ -f $source_dir/pyproject.toml ]] || die "--source $source_dir has no pyproject.toml"
  tarball="${TMPDIR:-/tmp}/rlmt-jax-$TPU_NAME.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=runs --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.pytest_cache -C "$source_dir" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_DIR.tar.gz" "${scope[@]}" --worker=all
  on_workers all "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && $pip_install"
fi
