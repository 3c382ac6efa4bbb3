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

r2d2ds_forward_stop() {
  R2D2DS_STOP_REQUESTED=1
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
    # wait returns early (status > 128) when a trapped signal arrives: keep waiting while the step runs.
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  # 75: every rank checkpointed and stopped. After a stop request any failure is requeued too: srun's
  # --kill-on-bad-exit can terminate a rank that was just about to exit with 75 itself (its code is then 143),
  # and if the stop checkpoint was cut short `latest` still names the previous complete one.
  if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] || { [ "$R2D2DS_STOP_REQUESTED" = 1 ] && [ "$rc" -ne 0 ]; }; then
    r2d2ds_log "stopped (exit code $rc); requeueing the job (it resumes from the run directory)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  r2d2ds_log "training step ended with exit code $rc"
  exit "$rc"
}
