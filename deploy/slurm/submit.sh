#!/bin/bash
# Submit the whole sweep as dependent jobs, with the settings of c5snn.env:
#   study create -> worker array (screening) -> promote -> worker array (promote trials) -> export
# Prints the job ids. Watch with squeue and `c5snn status --config ...`; a job that fails cancels
# those that depend on it (--kill-on-invalid-dep).
set -euo pipefail
C5SNN_SLURM_DIR=$(cd "$(dirname "$0")" && pwd)
export C5SNN_SLURM_DIR
source "$C5SNN_SLURM_DIR/common.sh"
mkdir -p "$C5SNN_LOGS"
submit=(sbatch --parsable --export=ALL --chdir="$C5SNN_HOME" --kill-on-invalid-dep=yes)
if [ -n "$C5SNN_PARTITION" ]; then submit+=(--partition="$C5SNN_PARTITION"); fi
if [ -n "$C5SNN_ACCOUNT" ]; then submit+=(--account="$C5SNN_ACCOUNT"); fi
single=(--output="$C5SNN_LOGS/%x-%j.out")
array=(--array="0-$((C5SNN_TASKS - 1))" --cpus-per-task="$C5SNN_CPUS_PER_TASK"
       --time="$C5SNN_TIME" --output="$C5SNN_LOGS/%x-%A_%a.out")
if [ "$C5SNN_GPUS_PER_TASK" -gt 0 ]; then array+=(--gres="gpu:$C5SNN_GPUS_PER_TASK"); fi
here=$C5SNN_SLURM_DIR
create=$("${submit[@]}" "${single[@]}" "$here/create.sbatch")
screening=$("${submit[@]}" "${array[@]}" --dependency="afterok:$create" "$here/workers.sbatch")
promote=$("${submit[@]}" "${single[@]}" --dependency="afterany:$screening" "$here/promote.sbatch")
rerun=$("${submit[@]}" "${array[@]}" --dependency="afterok:$promote" "$here/workers.sbatch")
export_=$("${submit[@]}" "${single[@]}" --dependency="afterany:$rerun" "$here/export.sbatch")
echo "create=$create screening=$screening promote=$promote promote_workers=$rerun export=$export_"
