"""``python -m dinocxr_fast.train [pretrain|linear|finetune|export-backbone] [options]``.

With no arguments it pretrains vitaev2_tiny on the embedded synthetic chest phantoms (the
``tiny_cpu`` preset: about 3 minutes on a 2-core CPU, no download) and leaves a run folder with
checkpoints, metrics, TensorBoard events and a summary. ``--data PATH --preset
dino_cxr_vitaev2_s`` on a GPU is the paper's run. Multi-GPU: ``torchrun --nproc_per_node N -m
dinocxr_fast.train ...``.

This file is the entry point only: the subcommands are in ``trainer/commands.py``, the loop in
``trainer/loop.py`` and each job (pretraining, fine-tuning, linear evaluation) in its own module.
"""
from __future__ import annotations

import sys

from dinocxr_fast import cli
from dinocxr_fast.config import ConfigError
from dinocxr_fast.trainer.commands import COMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "pretrain"
    if command not in COMMANDS:
        print(f"unknown subcommand {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cli.mark_command_start()  # train.max_minutes counts from here
    try:
        return COMMANDS[command](argv)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem at once, one line each
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _is_user_error(exc):  # one clear line for the errors a user can fix
            return cli.user_error(exc)
        raise
    finally:
        cli.clear_command_start()


def _is_user_error(exc: Exception) -> bool:
    # imported here: by now torch is loaded, and --help must not load it
    from dinocxr_fast.data import DatasetError  # noqa: PLC0415
    from dinocxr_fast.evaluate import MissingClassError  # noqa: PLC0415
    from dinocxr_fast.runtime.checkpoint import CheckpointError  # noqa: PLC0415
    from dinocxr_fast.trainer.loop import NonFiniteLossError  # noqa: PLC0415

    return isinstance(exc, (DatasetError, CheckpointError, NonFiniteLossError, MissingClassError))


if __name__ == "__main__":
    sys.exit(main())
