"""``python -m dinocxr_fast.train [pretrain] [options]``: the DINO-CXR trainer.

With no arguments it pretrains vitaev2_tiny on the embedded synthetic chest phantoms (the
``tiny_cpu`` preset: a couple of minutes on a CPU, no download) and leaves a run folder with
checkpoints, metrics, TensorBoard events and a summary. ``--data PATH --preset
dino_cxr_vitaev2_s`` on a GPU is the paper's run. Multi-GPU: ``torchrun --nproc_per_node N -m
dinocxr_fast.train ...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dinocxr_fast.config import ConfigError, list_presets, load_config

SUBCOMMANDS = ("pretrain", "finetune", "linear")
DEFAULT_PRESET = "tiny_cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinocxr_fast.train",
        description="DINO-CXR self-supervised pretraining of ViTAEv2 on chest X-rays.",
        epilog="Any config key can be set with --set section.key=value (see dinocxr_fast/configs/base.yaml).",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"config preset or YAML file ({', '.join(list_presets())})")
    parser.add_argument("--data", help="image folder to pretrain on (default: synthetic phantoms)")
    parser.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>)")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in --out, or the newest run of the preset) or a checkpoint/run folder")
    parser.add_argument("--save-backbone", action="store_true", help="export the teacher backbone as safetensors at the end")
    parser.add_argument("--knn-data", help="labelled ImageFolder root with train/ and val/ for the periodic kNN monitor")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--batch-size", type=int, help="optim.batch_size (per process)")
    parser.add_argument("--lr", type=float, help="optim.lr")
    parser.add_argument("--max-steps", type=int, help="train.max_steps: stop after this many steps in all")
    parser.add_argument("--device", help="train.device (auto, cpu, cuda)")
    parser.add_argument("--views", choices=("dino_cxr", "dino_multicrop"), help="data.views")
    parser.add_argument("--backend", help="backend of every fused op: auto (verified on this device), cpp, cuda, triton, torch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def flag_overrides(args: argparse.Namespace) -> dict:
    over: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            over.setdefault(section, {})[key] = value

    put("data", "path", args.data)
    put("data", "views", args.views)
    put("train", "knn_data", args.knn_data)
    put("train", "epochs", args.epochs)
    put("train", "max_steps", args.max_steps)
    put("train", "device", args.device)
    put("optim", "batch_size", args.batch_size)
    put("optim", "lr", args.lr)
    put("dino", "backend", args.backend)
    return over


def preset_label(preset: str) -> str:
    return Path(preset).stem


def resolve_resume(resume: str | None, out: Path | None, preset: str) -> Path | None:
    from dinocxr_fast.runtime import checkpoint as ckpt  # noqa: PLC0415

    if resume is None:
        return None
    if resume == "auto":
        if out is not None:
            return ckpt.latest(out)  # None: a fresh run in that folder
        runs = sorted(Path("runs").glob(f"{preset_label(preset)}-*"), key=lambda p: p.stat().st_mtime)
        for run in reversed(runs):
            found = ckpt.latest(run)
            if found is not None:
                return found
        return None
    path = Path(resume)
    if path.is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path}")
        return found
    if not path.is_file():
        raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint file or run folder")
    return path


def build_supervised_parser(command: str) -> argparse.ArgumentParser:
    what = {"finetune": "Fine-tune a (pretrained) backbone with a linear classifier.",
            "linear": "Linear evaluation: frozen backbone, cached features, a grid of linear heads."}[command]
    parser = argparse.ArgumentParser(prog=f"python -m dinocxr_fast.train {command}", description=what,
                                     epilog="Any key of dinocxr_fast/configs/supervised_base.yaml can be set with --set.")
    parser.add_argument("--pretrained", help="pretraining run folder, checkpoint, or backbone .safetensors; 'none' = random init")
    parser.add_argument("--data", required=True, help="labelled ImageFolder root with train/ and val/ (and test/)")
    parser.add_argument("--label-fraction", type=float, help="data.label_fraction: 0.01, 0.1, 1.0 ...")
    parser.add_argument("--preset", help="supervised preset or YAML file (e.g. supervised_tiny_cpu)")
    parser.add_argument("--out", help=f"run folder (default: runs/{command}-<timestamp>)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--batch-size", type=int, help="optim.batch_size (fine-tuning, per process)")
    parser.add_argument("--lr", type=float, help="optim.lr (fine-tuning)")
    parser.add_argument("--device", help="train.device (auto, cpu, cuda)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    if command == "finetune":
        parser.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint/run folder")
        parser.add_argument("--max-steps", type=int, help="train.max_steps")
    return parser


def adopt_pretrained_arch(cfg: dict) -> None:
    """A pretraining checkpoint knows its architecture: use it, so --pretrained alone is enough."""
    from dinocxr_fast.runtime import checkpoint as ckpt  # noqa: PLC0415

    source = cfg["model"]["pretrained"]
    if not source or str(source).lower() in ("none", "random"):
        return
    path = Path(source).expanduser()
    if path.is_dir():
        path = ckpt.latest(path) or path
    if path.suffix != ".pt" or not path.is_file():
        return
    state = ckpt.load(path)
    model = state.get("config", {}).get("model")
    if model:
        cfg["model"]["arch"] = model["arch"]
        cfg["model"]["in_chans"] = model["in_chans"]


def supervised(command: str, argv: list[str]) -> int:
    args = build_supervised_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    over: dict = {"data": {"path": args.data}}
    if args.pretrained is not None:
        over["model"] = {"pretrained": args.pretrained}
    if args.label_fraction is not None:
        over["data"]["label_fraction"] = args.label_fraction
    for section, key, value in (("train", "epochs", args.epochs), ("optim", "batch_size", args.batch_size),
                                ("optim", "lr", args.lr), ("train", "device", args.device),
                                ("train", "max_steps", getattr(args, "max_steps", None))):
        if value is not None:
            over.setdefault(section, {})[key] = value
    cfg = load_config(args.preset, over, args.set, base="supervised_base")
    adopt_pretrained_arch(cfg)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if command == "linear":
        from dinocxr_fast.linear_probe import run_linear  # noqa: PLC0415

        run_linear(cfg, out, show_progress=not args.quiet)
        return 0
    from dinocxr_fast.finetune import FinetuneJob  # noqa: PLC0415

    resume = resolve_resume(args.resume, out, "finetune")
    return run_job(lambda: FinetuneJob(cfg, out, resume=resume, show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train finetune --data {args.data} --out {out} --resume auto")


def run_job(make_job, resume_command: str) -> int:
    """Run a TrainingJob to its end; on a signal, say how to resume."""
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415

    job = make_job()
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_config(args.preset, flag_overrides(args), args.set)

    from dinocxr_fast.pretrain import PretrainJob  # noqa: PLC0415 - keep --help fast
    from dinocxr_fast.runtime import data as data_setup  # noqa: PLC0415
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415

    distributed.init_from_env(data_setup.device_from(cfg["train"]["device"]).type)  # so ranks agree on --out
    out = Path(args.out) if args.out else None
    resume = resolve_resume(args.resume, out, args.preset)
    if out is None:
        if resume is not None:
            out = resume.parent
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{preset_label(args.preset)}-{stamp}"
            out = Path(distributed.broadcast_object(str(out)))
    if resume is None and args.resume:
        print(f"--resume {args.resume}: no checkpoint found; starting a fresh run in {out}", file=sys.stderr)
    return run_job(lambda: PretrainJob(cfg, out, resume=resume, save_backbone=args.save_backbone,
                                       show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train pretrain --out {out} --resume auto")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "pretrain"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
    if command not in SUBCOMMANDS:
        print(f"unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        return pretrain(argv) if command == "pretrain" else supervised(command, argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line for the errors a user can fix
        from dinocxr_fast.data import DatasetError  # noqa: PLC0415
        from dinocxr_fast.runtime.job import NonFiniteLossError  # noqa: PLC0415
        from dinocxr_fast.runtime.checkpoint import CheckpointError  # noqa: PLC0415

        if isinstance(exc, (DatasetError, CheckpointError, NonFiniteLossError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
