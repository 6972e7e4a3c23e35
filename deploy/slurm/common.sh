# Sourced by every template and submit.sh: the settings of c5snn.env and what follows from them.
# Not meant to be edited.
# shellcheck source=c5snn.env
source "${C5SNN_SLURM_DIR:-${SLURM_SUBMIT_DIR:-.}}/c5snn.env"
: "${C5SNN_BIN:=$C5SNN_HOME/.venv/bin/c5snn}"
if [ -z "$C5SNN_STORAGE" ] && [ -s "$C5SNN_PG_URL_FILE" ]; then
  C5SNN_STORAGE=$(cat "$C5SNN_PG_URL_FILE")  # written by postgres.sbatch (mode 600)
fi
export C5SNN_HOME C5SNN_CONFIG C5SNN_ARTIFACTS C5SNN_STORAGE  # c5snn reads the last two itself
PATH="$(dirname "$C5SNN_BIN"):$PATH"  # `c5snn` is the checkout's (a process of its own: signals reach it)
