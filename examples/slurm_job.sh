#!/bin/bash
# A SLURM job on compute nodes without internet: events go to a shared spill directory,
# the login node sends them (`argus sync --watch`), and a job that dies by SIGKILL
# (out of memory) is still marked failed by the check after it.
# A template: train.py stands for your script, and argus must be importable on the nodes
# (`pip install .` from a clone, or argus.py in the job's working directory).
#SBATCH --job-name=etth1_dlinear
#SBATCH --time=02:00:00
#SBATCH --signal=B:TERM@60          # SIGTERM 60 s before the limit: argus marks the run failed

export ARGUS_OFFLINE=1
export ARGUS_SPILL_DIR=/scratch/$USER/argus-spill
# every task of an array lands in one batch: same project, experiment and commit
ARGUS_BATCH_ID=$(python3 -m argus batch-id --project my-bench --experiment etth1)
export ARGUS_BATCH_ID

python3 train.py --batch-id "$ARGUS_BATCH_ID"
status=$?
if [ $status -ne 0 ] && [ $status -ne 143 ]; then
    # 137 = SIGKILL (e.g. the OOM killer): the process had no chance to report
    python3 -m argus emit job_failed --batch-id "$ARGUS_BATCH_ID" --job-id "$SLURM_JOB_NAME" \
        status=FAILED reason="exit status $status (SLURM job $SLURM_JOB_ID)"
fi
exit $status

# On the login node, once or as a small daemon:
#   python3 -m argus sync --dir /scratch/$USER/argus-spill --url https://argus.example.org --watch 60
