"""The trainer's subcommands: each parses its command line, builds its config and runs its job.

Modules that load torch are imported inside the commands, after the command line is parsed, so
``--help`` and a config error answer before torch is loaded.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from dinocxr_fast.config import ConfigError, load_config
from dinocxr_fast.trainer import arguments


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def run_job(make_job, resume_command: str, run_dir: Path) -> int:
    """Run a TrainingJob to its end; on a signal, say how to resume. A run that fails before its
    first checkpoint leaves no folder behind."""
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415 - loads torch
    from dinocxr_fast.runtime.checkpoint import discard_if_failed  # noqa: PLC0415

    with discard_if_failed(run_dir):
        try:
            job = make_job()
        except BaseException:
            distributed.shutdown()
            raise
        try:
            stop = job.run()
        finally:
            job.close()
            distributed.shutdown()
    if stop.kind == "signal":
        print(f"stopped by {stop.detail} at step {job.step}; checkpoint saved. Resume with: {resume_command}",
              file=sys.stderr)
    return 0


def pretrain(argv: list[str]) -> int:
    args = arguments.pretrain_parser().parse_args(argv)
    _log_to_stderr()
    preset = args.preset or arguments.DEFAULT_PRESET
    out = Path(args.out) if args.out else None
    overrides = arguments.flag_overrides(args)
    resume, cfg = _resumed(args.resume, out, preset, overrides, args.set, base="base")
    if cfg is None:
        cfg = load_config(preset, overrides, args.set)
    elif args.preset:
        print(f"--preset {args.preset} ignored: the run continues with {resume.parent / 'config.yaml'}", file=sys.stderr)

    from dinocxr_fast.runtime import distributed  # noqa: PLC0415 - loads torch
    from dinocxr_fast.trainer.pretrain import PretrainJob  # noqa: PLC0415

    distributed.init_from_env(distributed.device_from(cfg["train"]["device"]).type)  # so ranks agree on --out
    if out is None:
        if resume is not None:
            out = resume.parent
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path(distributed.broadcast_object(str(Path("runs") / f"{Path(preset).stem}-{stamp}")))
    if resume is None and args.resume:
        print(f"--resume {args.resume}: no checkpoint found; starting a fresh run in {out}", file=sys.stderr)
    return run_job(lambda: PretrainJob(cfg, out, resume=resume, save_backbone=args.save_backbone,
                                       show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train pretrain --out {out} --resume auto", out)


def _resumed(resume: str | None, out: Path | None, preset: str, overrides: dict, sets: list[str], *,
             base: str) -> tuple[Path | None, dict | None]:
    """(the checkpoint ``--resume`` names, the run's config with the safe changes), or Nones when
    there is nothing to resume."""
    if resume is None:
        return None, None
    from dinocxr_fast.trainer import resume as resuming  # noqa: PLC0415 - loads torch

    checkpoint = resuming.resolve_resume(resume, out, preset)
    if checkpoint is None:
        return None, None
    return checkpoint, resuming.resume_config(checkpoint.parent, overrides, sets, base=base)


def supervised(command: str, argv: list[str]) -> int:
    """``linear`` or ``finetune``."""
    args = arguments.supervised_parser(command).parse_args(argv)
    _log_to_stderr()
    overrides = arguments.flag_overrides(args, arguments.SUPERVISED_FLAGS)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume, cfg = _resumed(getattr(args, "resume", None), out, "finetune", overrides, args.set, base="supervised_base")
    if cfg is None:
        if args.data is None:
            raise ConfigError("--data is required: a labelled ImageFolder root with train/ and val/ class folders")
        cfg = load_config(args.preset, overrides, args.set, base="supervised_base")
        from dinocxr_fast.trainer.resume import adopt_pretrained_arch  # noqa: PLC0415 - loads torch

        adopt_pretrained_arch(cfg)
    from dinocxr_fast.runtime.checkpoint import discard_if_failed  # noqa: PLC0415

    if command == "linear":
        from dinocxr_fast.trainer.linear_probe import run_linear  # noqa: PLC0415

        with discard_if_failed(out):
            run_linear(cfg, out, show_progress=not args.quiet)
        return 0
    from dinocxr_fast.trainer.finetune import FinetuneJob  # noqa: PLC0415

    return run_job(lambda: FinetuneJob(cfg, out, resume=resume, show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train finetune --out {out} --resume auto", out)


def export_backbone(argv: list[str]) -> int:
    args = arguments.export_backbone_parser().parse_args(argv)
    from dinocxr_fast.trainer.teacher_backbone import export_backbone_from_run  # noqa: PLC0415 - loads torch

    path, step = export_backbone_from_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"wrote {path} (teacher backbone at step {step}); use it with "
          f"`python -m dinocxr_fast.train linear --pretrained {path} --data LABELLED_ROOT`")
    return 0


COMMANDS = {"pretrain": pretrain, "export-backbone": export_backbone,
            "linear": lambda argv: supervised("linear", argv), "finetune": lambda argv: supervised("finetune", argv)}
