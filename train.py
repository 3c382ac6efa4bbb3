"""R2D2 pre-training: `deepspeed [--num_gpus N] train.py --config CONFIG.yaml [--section.key=value ...]`.

Also under torchrun, `srun` (one task per GPU), `mpirun`, or plain `python train.py` (one process, debugging).
parse -> build (data, model, EMA teacher, DeepSpeed engine) -> loop -> checkpoint -> retrieval eval -> export.
The loop itself lives in r2d2ds/trainer.py; this file stays one screen. Exit codes: 0 done, 2 bad config or
checkpoint, 75 (REQUEUE_EXIT_CODE) stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue and --resume.
"""

import argparse
import sys

import r2d2ds  # noqa: F401  (installs the CPU torchvision shim before timm/transformers load)
from r2d2ds.checkpoint import CheckpointError
from r2d2ds.config import ConfigError, load_config
from r2d2ds.preemption import REQUEUE_EXIT_CODE, Preempted
from r2d2ds.preflight import check_training_paths
from r2d2ds.trainer import Trainer, configure_logging


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (sections: model, loss, data, train, eval)")
    parser.add_argument("--resume", action="store_true", help="resume from the run directory's latest checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides + (["--train.resume=true"] if args.resume else []))
        check_training_paths(cfg)  # every path key resolves here, on every rank, before any model is built
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        Trainer(cfg).fit()
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"{e}: exiting with {REQUEUE_EXIT_CODE} so the job is requeued and resumes", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
