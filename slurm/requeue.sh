# Sourced by the sbatch scripts: run one job step so that a stop signal checkpoints it and the job requeues.
#
# The batch shell receives `#SBATCH --signal=B:USR1@N` (and SIGTERM at the time limit or on preemption). Its trap
# forwards SIGUSR1 to every task of the job's steps (`scancel --signal=USR1` without -b reaches the tasks, not
# this shell); each rank finishes the step in flight together with the others, writes a checkpoint and exits
# with 75 (r2d2ds.preemption.REQUEUE_EXIT_CODE). On 75 the job is requeued (`scontrol requeue`, which needs
# `#SBATCH --requeue`) and the next run of this script resumes from the run directory (train.py --resume).
# A trap only runs while the shell waits with `wait`, so the step runs in the background and we wait for it.

REQUEUE_EXIT_CODE=75

r2d2ds_log() { echo "[r2d2ds $(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

R2D2DS_STOP_REQUESTED=0

R2D2DS_JOB_STATE=RUNNING

r2d2ds_forward_stop() {
  R2D2DS_STOP_REQUESTED=1
  # The job's state when the signal came: RUNNING for a warning (--signal=B:USR1@N, `scancel -b --signal=USR1`),
  # COMPLETING when Slurm is already ending the job (`scancel JOBID` sends SIGTERM that way).
  R2D2DS_JOB_STATE=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  r2d2ds_log "got a stop signal: every rank finishes its step, checkpoints and exits $REQUEUE_EXIT_CODE"
  scancel --signal=USR1 "$SLURM_JOB_ID"
}

run_requeueable() {
  "$@" &
  local pid=$! rc
  trap r2d2ds_forward_stop USR1 TERM
  while :; do
    wait "$pid"
    rc=$?
    [ "$rc" -le 128 ] && break
    # wait also returns (status > 128) when a trapped signal arrives: keep waiting while the step runs. If the
    # step ended in that moment its status is still to be collected (127: srun's own 128+n was the status).
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    local again=$?
    [ "$again" -ne 127 ] && rc=$again
    break
  done
  trap - USR1 TERM
  # 75: every rank checkpointed and stopped. After a stop request any failure is requeued too: srun's
  # --kill-on-bad-exit can terminate a rank that was just about to exit with 75 itself (its code is then 143),
  # and if the stop checkpoint was cut short `latest` still names the previous complete one.
  if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] || { [ "$R2D2DS_STOP_REQUESTED" = 1 ] && [ "$rc" -ne 0 ]; }; then
    # `scancel JOBID` (the user ending the job) reaches us as SIGTERM too, and Slurm accepts `scontrol requeue`
    # of the job it is cancelling: requeueing then would bring a cancelled job back. Requeue only what was
    # still running when the signal came; the checkpoint is written either way.
    if [ "${R2D2DS_JOB_STATE:-RUNNING}" != RUNNING ]; then
      r2d2ds_log "Slurm was already ending the job (state $R2D2DS_JOB_STATE: scancel, time limit or preemption):" \
        "not requeueing (exit code $rc); resubmit to resume"
      exit "$rc"
    fi
    r2d2ds_log "stopped (exit code $rc); requeueing the job (it resumes from the run directory)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  r2d2ds_log "training step ended with exit code $rc"
  exit "$rc"
}
