"""``python -m dinocxr_fast.train [pretrain] [options]``: the DINO-CXR trainer.

With no arguments it pretrains vitaev2_tiny on the embedded synthetic chest phantoms (the
``tiny_cpu`` preset: about 3 minutes on a 2-core CPU, no download) and leaves a run folder with
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

from dinocxr_fast import cli
from dinocxr_fast.cli import parser as cli_parser
from dinocxr_fast.config import ConfigError, list_presets, load_config

SUBCOMMANDS = {
    "pretrain": "DINO-CXR self-supervised pretraining (the default when no subcommand is given)",
    "linear": "linear evaluation of a pretrained backbone on a labelled ImageFolder",
    "finetune": "fine-tune a pretrained backbone with a classifier on a labelled ImageFolder",
    "export-backbone": "write the teacher backbone of a pretraining run as safetensors (no training)",
}
DEFAULT_PRESET = "tiny_cpu"


def build_parser() -> argparse.ArgumentParser:
    subcommands = "\n".join(f"  {name:<16} {what}" for name, what in SUBCOMMANDS.items())
    parser = cli_parser(
        "python -m dinocxr_fast.train [pretrain]",
        "DINO-CXR self-supervised pretraining of ViTAEv2 on chest X-rays.\n\nsubcommands (each has its own "
        f"--help):\n{subcommands}",
        "Any config key can be set with --set section.key=value (see dinocxr_fast/configs/base.yaml); options "
        "without a default shown take the preset's value.",
    )
    parser.add_argument("--preset", help=f"config preset or YAML file ({', '.join(list_presets())}); default: "
                        f"{DEFAULT_PRESET}, or the run's own config.yaml with --resume")
    parser.add_argument("--data", help="image folder to pretrain on; of a root with train/ (val/, test/) only train/ "
                        "is read (data.split); default: synthetic phantoms")
    parser.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>)")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in --out, or the newest run of the preset) or a checkpoint/run folder")
    parser.add_argument("--save-backbone", action="store_true", help="export the teacher backbone as safetensors at the end")
    parser.add_argument("--knn-data", help="labelled ImageFolder root with train/ and val/ for the periodic kNN monitor")
    parser.add_argument("--epochs", type=int, help="train.epochs: passes over the data")
    parser.add_argument("--batch-size", type=int, help="optim.batch_size: images per step and process")
    parser.add_argument("--lr", type=float, help="optim.lr: base learning rate")
    parser.add_argument("--max-steps", type=int, help="train.max_steps: stop after this many steps in all")
    parser.add_argument("--device", help="train.device: auto (GPU when present), cpu or cuda")
    parser.add_argument("--views", choices=("dino_cxr", "dino_multicrop"), help="data.views: the paper's fixed-size views or DINO's multi-crop")
    parser.add_argument("--backend", help="backend of every fused op: auto (verified on this device), cpp, cuda, triton or torch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4 (repeatable)")
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


# Keys a resume may change: they do not alter what the run computes, only how long it runs, how it
# is logged, checkpointed and monitored, and which hardware / backend runs it. Anything else (model,
# data, optimiser, DINO recipe, seed, precision) would make the continued run a different run.
SAFE_AT_RESUME = {
    "train": {"epochs", "max_steps", "max_minutes", "fit_schedules", "device", "compile", "log_every", "ckpt_every",
              "keep_last", "loss_check_every", "knn_data", "knn_every", "knn_k", "knn_temperature", "knn_size"},
    "data": {"loader", "num_workers"},
    "dino": {"backend"},
}


PER_COMMAND_BUDGETS = ("max_steps", "max_minutes")


def merge_overrides(first: dict, second: dict) -> dict:
    out = {k: dict(v) for k, v in first.items()}
    for section, values in second.items():
        out.setdefault(section, {}).update(values)
    return out


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(run_dir: Path, overrides: dict, sets: list[str], *, base: str = "base") -> dict | None:
    """The run's own ``config.yaml`` with the changes asked at resume applied where they are safe
    (SAFE_AT_RESUME; anything else is a one-line error). Each change is printed and appended to
    ``RUN/resume-changes.log``. None when the run has no config.yaml."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    # train.max_steps / max_minutes budget one command, not the run: a resume runs to the run's end
    # unless they are given again (the printed "continue this run" must continue it)
    budgets = {"train": dict.fromkeys(PER_COMMAND_BUDGETS)}
    cfg = load_config(str(saved), budgets, base=base)
    wanted = load_config(str(saved), merge_overrides(budgets, overrides), sets, base=base)
    before, after = _flat(cfg), _flat(wanted)
    changes = [(k, before.get(k), v) for k, v in after.items() if before.get(k) != v]
    unsafe = [k for k, _, _ in changes if k.split(".", 1)[1] not in SAFE_AT_RESUME.get(k.split(".", 1)[0], ())]
    if unsafe:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {after[k]!r}" for k in unsafe)
        raise ConfigError(f"--resume continues {run_dir} with its own config.yaml; these changes would make it a "
                          f"different run: {detail}. Start a new run (another --out) for them.")
    if changes:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"{stamp} resume: {k} {old!r} -> {new!r}" for k, old, new in changes]
        print("\n".join(lines), file=sys.stderr)
        with open(Path(run_dir) / "resume-changes.log", "a") as f:
            f.write("\n".join(lines) + "\n")
    return wanted


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
    parser = cli_parser(f"python -m dinocxr_fast.train {command}", what,
                        "Any key of dinocxr_fast/configs/supervised_base.yaml can be set with --set; options without a "
                        "default shown take the preset's value.")
    parser.add_argument("--pretrained", help="pretraining run folder, checkpoint, or backbone .safetensors; 'none' = random init")
    parser.add_argument("--data", help="labelled ImageFolder root with train/ and val/ (and test/); required unless resuming")
    parser.add_argument("--label-fraction", type=float, help="data.label_fraction: the share of labelled training images used, e.g. 0.01, 0.1, 1.0")
    parser.add_argument("--preset", help="supervised preset or YAML file (e.g. supervised_tiny_cpu)")
    parser.add_argument("--out", help=f"run folder (default: runs/{command}-<timestamp>)")
    parser.add_argument("--epochs", type=int, help="train.epochs: passes over the training images")
    parser.add_argument("--batch-size", type=int, help="optim.batch_size: fine-tuning images per step and process")
    parser.add_argument("--lr", type=float, help="optim.lr: fine-tuning base learning rate")
    parser.add_argument("--device", help="train.device: auto (GPU when present), cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    if command == "finetune":
        parser.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint/run folder")
        parser.add_argument("--max-steps", type=int, help="train.max_steps: stop after this many steps in all")
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
    over: dict = {"data": {"path": args.data}} if args.data is not None else {"data": {}}
    if args.pretrained is not None:
        over["model"] = {"pretrained": args.pretrained}
    if args.label_fraction is not None:
        over["data"]["label_fraction"] = args.label_fraction
    for section, key, value in (("train", "epochs", args.epochs), ("optim", "batch_size", args.batch_size),
                                ("optim", "lr", args.lr), ("train", "device", args.device),
                                ("train", "max_steps", getattr(args, "max_steps", None))):
        if value is not None:
            over.setdefault(section, {})[key] = value
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = resolve_resume(getattr(args, "resume", None), out, "finetune")
    cfg = resume_config(resume.parent, over, args.set, base="supervised_base") if resume is not None else None
    if cfg is None:
        if args.data is None:
            raise ConfigError("--data is required: a labelled ImageFolder root with train/ and val/ class folders")
        cfg = load_config(args.preset, over, args.set, base="supervised_base")
        adopt_pretrained_arch(cfg)
    if command == "linear":
        from dinocxr_fast.linear_probe import run_linear  # noqa: PLC0415
        from dinocxr_fast.runtime.checkpoint import discard_if_failed  # noqa: PLC0415

        with discard_if_failed(out):
            run_linear(cfg, out, show_progress=not args.quiet)
        return 0
    from dinocxr_fast.finetune import FinetuneJob  # noqa: PLC0415

    return run_job(lambda: FinetuneJob(cfg, out, resume=resume, show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train finetune --out {out} --resume auto", out)


def run_job(make_job, resume_command: str, run_dir: Path) -> int:
    """Run a TrainingJob to its end; on a signal, say how to resume."""
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out) if args.out else None
    resume = resolve_resume(args.resume, out, preset)
    # a resumed run continues with its own config; the command line may change only safe keys
    cfg = resume_config(resume.parent, flag_overrides(args), args.set) if resume is not None else None
    if cfg is None:
        cfg = load_config(preset, flag_overrides(args), args.set)
    elif args.preset:
        print(f"--preset {args.preset} ignored: the run continues with {resume.parent / 'config.yaml'}", file=sys.stderr)

    from dinocxr_fast.pretrain import PretrainJob  # noqa: PLC0415 - keep --help fast
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415

    distributed.init_from_env(distributed.device_from(cfg["train"]["device"]).type)  # so ranks agree on --out
    if out is None:
        if resume is not None:
            out = resume.parent
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{preset_label(preset)}-{stamp}"
            out = Path(distributed.broadcast_object(str(out)))
    if resume is None and args.resume:
        print(f"--resume {args.resume}: no checkpoint found; starting a fresh run in {out}", file=sys.stderr)
    return run_job(lambda: PretrainJob(cfg, out, resume=resume, save_backbone=args.save_backbone,
                                       show_progress=not args.quiet),
                   f"python -m dinocxr_fast.train pretrain --out {out} --resume auto", out)


def export_backbone(argv: list[str]) -> int:
    parser = cli_parser("python -m dinocxr_fast.train export-backbone", SUBCOMMANDS["export-backbone"] + ".")
    parser.add_argument("run", help="pretraining run folder (its latest checkpoint is read) or a checkpoint file")
    parser.add_argument("--out", help="safetensors file to write (default: RUN/teacher_backbone.safetensors)")
    args = parser.parse_args(argv)
    from dinocxr_fast.pretrain import export_backbone_from_run  # noqa: PLC0415

    path, step = export_backbone_from_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"wrote {path} (teacher backbone at step {step}); use it with "
          f"`python -m dinocxr_fast.train linear --pretrained {path} --data LABELLED_ROOT`")
    return 0


def main(argv: list[str] | None = None) -> int:
    cli.mark_command_start()
    try:
        return _main(argv)
    finally:
        cli.clear_command_start()


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "pretrain"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
    if command not in SUBCOMMANDS:
        print(f"unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        if command == "export-backbone":
            return export_backbone(argv)
        return pretrain(argv) if command == "pretrain" else supervised(command, argv)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem at once, one line each
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line for the errors a user can fix
        from dinocxr_fast.data import DatasetError  # noqa: PLC0415
        from dinocxr_fast.evaluate import MissingClassError  # noqa: PLC0415
        from dinocxr_fast.runtime.job import NonFiniteLossError  # noqa: PLC0415
        from dinocxr_fast.runtime.checkpoint import CheckpointError  # noqa: PLC0415

        if isinstance(exc, (DatasetError, CheckpointError, NonFiniteLossError, MissingClassError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
