#!/bin/bash
# Many AOIs on a SLURM cluster: one SLURM job per AOI through Hydra's submitit launcher
# (conf/hydra/launcher/slurm.yaml; needs `pip install -e ".[slurm]"`). Run it on the login node:
# it submits a job array, waits, and prints one line per AOI; the exit code is non-zero if any AOI failed.
#
#   examples/slurm/sweep_aois.sh CHECKPOINT DATA_ROOT iowa,kenya,amazon [more overrides]
#
# Override launcher keys as usual, e.g. hydra.launcher.partition=gpu hydra.launcher.timeout_min=240;
# several GPUs per AOI: hydra.launcher.gpus_per_node=4 hydra.launcher.tasks_per_node=4 trainer.devices=4
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CHECKPOINT DATA_ROOT AOI[,AOI...] [overrides ...]" >&2
    exit 2
fi
CHECKPOINT=$1 DATA_ROOT=$2 AOIS=$3
shift 3
PYTHON=${PYTHON:-python}          # e.g. PYTHON=$PWD/.venv/bin/python
HARDWARE=${HARDWARE:-lowvr}       # a stage2 hardware profile: highvr, lowvr, cpu
LAUNCHER=${LAUNCHER:-slurm}       # submitit_local runs the same sweep on this machine (a dry run)
# Give absolute paths: the jobs run on other machines.
exec "$PYTHON" -m stage2.predict -m hydra/launcher="$LAUNCHER" \
    checkpoint="$CHECKPOINT" data_root="$DATA_ROOT" aoi="$AOIS" hardware="$HARDWARE" "$@"
