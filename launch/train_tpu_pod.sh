#!/usr/bin/env bash
# Trains on every host of a Cloud TPU VM pod slice: one `python -m pixelllm.main` process per
# host, started over `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the pod's
# coordinator and process ids itself (jax.distributed on a TPU VM); each host reads its own share
# of the data (the pipeline shards by process index). The repository must be checked out at
# --repo_dir on every host; each host sets up its .venv (launch/setup_env.sh) plus the TPU
# runtime at the locked jax version. The work dir must be on GCS: every host writes checkpoints.
#
#   bash launch/train_tpu_pod.sh --tpu=my-v5p-64 --zone=us-east5-a \
#       --config=configs/stages.py:trace --workdir=gs://my-bucket/pixelllm/trace \
#       [--project=P] [--worker=all] [--repo_dir=pixelllm] [--env=KEY=VALUE ...] [--dry-run] \
#       [-- --config.train.steps=100 ...]   # after --: more flags for pixelllm.main
#
# --dry-run prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/train_common.sh
source launch/train_common.sh

tpu="" zone="" project="" config="" workdir="" worker="all" repo_dir="pixelllm" dry_run=0
envs=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --repo_dir=*) repo_dir=${1#*=} ;;
    --env=*) envs+=("${1#*=}") ;;
    --dry-run|--dry_run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) usage "unknown argument $1" ;;
  esac
  shift
done

[ -n "$tpu" ] || usage "--tpu (the TPU VM's name) is required"
[ -n "$zone" ] || usage "--zone is required"
[ -n "$workdir" ] || usage "--workdir is required"
check_config_and_envs "$config" "${envs[@]}"
[[ $workdir == gs://* ]] ||
  usage "--workdir=$workdir must be a gs:// path (every host writes to it)"
[[ $worker == all || $worker =~ ^[0-9]+(,[0-9]+)*$ ]] || usage "--worker=$worker: all or 0,1,..."

jax_version=$(locked_jax_version)
tpu_runtime=$(quote "jax[tpu]==$jax_version")
setup="bash launch/setup_env.sh && .venv/bin/python -m pip install -q $tpu_runtime"
train=(.venv/bin/python -m pixelllm.main "--config=$config" "--workdir=$workdir" "${extra[@]}")
if [ ${#envs[@]} -gt 0 ]; then
  train=(env "${envs[@]}" "${train[@]}")
fi
remote="cd $(quote "$repo_dir") && $setup && $(quote_all "${train[@]}")"

command=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
if [ -n "$project" ]; then
  command+=("--project=$project")
fi
command+=("--worker=$worker" "--command=$remote")

if [ "$dry_run" = 1 ]; then
  quote_all "${command[@]}"
  echo
else
  exec "${command[@]}"
fi
