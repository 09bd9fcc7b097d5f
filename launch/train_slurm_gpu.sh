#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: `srun` starts `python -m pixelllm.main` on every node, one
# process per GPU (default) or one per node. jax.distributed finds the coordinator, the process
# count and ids from SLURM's variables; with one process per GPU each process drives the GPU of
# its SLURM_LOCALID (JAX's default under SLURM), with one per node JAX_LOCAL_DEVICE_IDS gives it
# all of them. Run from a login node (srun allocates) or inside an sbatch/salloc allocation that
# fits the flags. The repository and the work dir must be on a file system every node sees;
# .venv is set up here first (launch/setup_env.sh plus the CUDA runtime at the locked jax version).
#
#   bash launch/train_slurm_gpu.sh --config=configs/stages.py:trace \
#       --workdir=/shared/pixelllm/trace --nodes=4 [--gpus_per_node=8] \
#       [--processes=per_gpu|per_node] [--partition=P] [--time=2-00:00:00] [--job_name=pixelllm] \
#       [--env=KEY=VALUE ...] [--dry-run] [-- --config.train.steps=100 ...]
#
# --dry-run prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=launch/train_common.sh
source launch/train_common.sh

config="" workdir="" nodes=1 gpus_per_node=8 processes="per_gpu" partition="" time_limit=""
job_name="pixelllm" dry_run=0 envs=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --processes=*) processes=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job_name=*) job_name=${1#*=} ;;
    --env=*) envs+=("${1#*=}") ;;
    --dry-run|--dry_run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) usage "unknown argument $1" ;;
  esac
  shift
done

[ -n "$workdir" ] || usage "--workdir is required"
check_config_and_envs "$config" "${envs[@]}"
[[ $workdir == /* || $workdir == gs://* ]] ||
  usage "--workdir=$workdir must be absolute (on a file system every node sees) or gs://"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || usage "--nodes=$nodes: expected a positive integer"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] ||
  usage "--gpus_per_node=$gpus_per_node: expected a positive integer"

case "$processes" in
  per_gpu) tasks_per_node=$gpus_per_node ;;
  per_node)
    tasks_per_node=1
    envs=("JAX_LOCAL_DEVICE_IDS=$(seq -s , 0 $((gpus_per_node - 1)))" "${envs[@]}")
    ;;
  *) usage "--processes=$processes: per_gpu or per_node" ;;
esac

jax_version=$(locked_jax_version)
setup_env=(bash launch/setup_env.sh)
setup_cuda=(.venv/bin/python -m pip install -q "jax[cuda12]==$jax_version")

# srun --export=ALL hands its own environment to every task (its list form splits on commas,
# which JAX_LOCAL_DEVICE_IDS holds).
command=()
[ ${#envs[@]} -eq 0 ] || command+=(env "${envs[@]}")
command+=(srun "--job-name=$job_name" "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node"
          "--gpus-per-node=$gpus_per_node" --kill-on-bad-exit=1 --export=ALL)
[ -z "$partition" ] || command+=("--partition=$partition")
[ -z "$time_limit" ] || command+=("--time=$time_limit")
command+=(.venv/bin/python -m pixelllm.main "--config=$config" "--workdir=$workdir" "${extra[@]}")

if [ "$dry_run" = 1 ]; then
  quote_all "${setup_env[@]}"; echo
  quote_all "${setup_cuda[@]}"; echo
  quote_all "${command[@]}"; echo
else
  "${setup_env[@]}"
  "${setup_cuda[@]}"
  exec "${command[@]}"
fi
