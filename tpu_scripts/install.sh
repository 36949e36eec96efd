#!/usr/bin/env bash
# Installs rlmt-jax with jax[tpu] on every worker of a TPU VM: the code in ~/rlmt-jax, a Python >= 3.11
# virtualenv in ~/rlmt-jax/.venv, and ~/rlmt-jax/data for your data. A reinstall updates the code in place
# and never deletes runs/ or data.
#
# usage: install.sh --name NAME --zone ZONE [--project PROJECT]
#                   [--source DIR | --git URL [--ref REF]] [--python PYTHON] [--dry-run]
#   --source    ship this git checkout's tracked files, as they are in its working tree (default: the
#               checkout these scripts are in); untracked files (.venv, runs/, data) stay behind: copy
#               data with `gcloud compute tpus tpu-vm scp FILE NAME:rlmt-jax/data/ --worker=all`
#   --git       fetch this repository on every worker instead (--ref: a branch, tag or commit; default HEAD)
#   --python    the workers' Python that makes the virtualenv (>= 3.11); default: the first of python3.13,
#               python3.12, python3.11, python3 that is >= 3.11 with venv, else uv installs CPython 3.12
#               (Ubuntu 22.04 TPU images have Python 3.10)
#   --dry-run   print the commands instead of running them
# The files a source install shipped are listed in ~/rlmt-jax/.installed-files; the next install removes
# those (files dropped from the project go too) and nothing else before it unpacks the new ones.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
git_url=""
git_ref=""
python=""
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

# The virtualenv: kept when it is there with Python >= 3.11, else made with the first Python >= 3.11 found.
is_311="-c 'import sys; sys.exit(sys.version_info < (3, 11))'"
makes_venvs="-c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))'"  # Debian: python3.X-venv
if [[ -n $python ]]; then
  candidates=$(quote "$python")
  missing="echo \"\$(hostname): $(quote "$python") is not a Python >= 3.11 with venv\" >&2; exit 1"
else
  candidates="python3.13 python3.12 python3.11 python3"
  # uv from PyPI (or its installer where pip is missing or refuses --user), then a CPython 3.12 of its own
  missing="{ python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }\
 && \"\$HOME\"/.local/bin/uv venv --seed --python 3.12 .venv"
fi
make_venv="if ! .venv/bin/python $is_311 2>/dev/null; then rm -rf .venv; py=; \
for p in $candidates; do if command -v \"\$p\" >/dev/null && \"\$p\" $makes_venvs 2>/dev/null; then py=\$p; break; fi; done; \
if [ -n \"\$py\" ]; then \"\$py\" -m venv .venv; else $missing; fi; fi"
pip_install=".venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -e \".[tpu]\""

if [[ -n $git_url ]]; then
  # fetch and check out over the folder: tracked files are updated, untracked ones (runs/, data) stay
  on_workers all "set -e; mkdir -p $REMOTE_DIR/data; cd $REMOTE_DIR; \
git rev-parse --git-dir >/dev/null 2>&1 || git init -q; \
git fetch -q --depth=1 $(quote "$git_url") $(quote "${git_ref:-HEAD}"); git checkout -q --force FETCH_HEAD; \
$make_venv; $pip_install"
else
  [[ -f $source_dir/pyproject.toml ]] || die "--source $source_dir has no pyproject.toml"
  git -C "$source_dir" rev-parse --git-dir >/dev/null 2>&1 \
    || die "--source $source_dir is not a git checkout (install ships its tracked files)"
  tarball="${TMPDIR:-/tmp}/rlmt-jax-$TPU_NAME.tar.gz"
  file_list="${TMPDIR:-/tmp}/rlmt-jax-$TPU_NAME.files"
  # the tracked files as they are in the working tree (one deleted there is left out), NUL-separated
  if ((DRY_RUN)); then
    printf '%s > %s\n' "$(quote_all git -C "$source_dir" ls-files -z)" "$(quote "$file_list")"
  else
    trap 'rm -f "$file_list" "$tarball"' EXIT
    git -C "$source_dir" ls-files -z | while IFS= read -r -d '' file; do
      if [[ -e $source_dir/$file ]]; then printf '%s\0' "$file"; fi
    done > "$file_list"
  fi
  run tar -czf "$tarball" -C "$source_dir" --null -T "$file_list"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_DIR.tar.gz" "${scope[@]}" --worker=all
  on_workers all "set -e; mkdir -p $REMOTE_DIR/data; cd $REMOTE_DIR; \
if [ -f .installed-files ]; then tr '\\n' '\\0' < .installed-files | xargs -0 rm -f --; fi; \
tar -xzf ../$REMOTE_DIR.tar.gz; tar -tzf ../$REMOTE_DIR.tar.gz > .installed-files; \
rm -f ../$REMOTE_DIR.tar.gz; $make_venv; $pip_install"
fi
