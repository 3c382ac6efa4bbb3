"""`r2d2ds <command>`: prepare shards, evaluate or export a model. Training runs through `deepspeed train.py`."""

from __future__ import annotations

import sys

COMMANDS = {
    "prepare": ("r2d2ds.data.prepare", "convert images + captions (or the synthetic generator) into shards"),
    "eval": ("r2d2ds.eval", "two-stage retrieval evaluation of an exported model"),
    "export": ("r2d2ds.export", "export a training run's checkpoint as safetensors + config + tokenizer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: r2d2ds <command> [args]\n\ncommands:\n" + "\n".join(lines)
              + "\n\ntraining: deepspeed [--num_gpus N] train.py --config CONFIG.yaml [--section.key=value ...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
