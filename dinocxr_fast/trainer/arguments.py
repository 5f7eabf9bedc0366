"""The trainer's command lines: one parser per subcommand, and the flags that map onto config keys.

Imports nothing heavy, so ``--help`` answers before torch is loaded.
"""
from __future__ import annotations

import argparse

from dinocxr_fast.cli import parser as cli_parser
from dinocxr_fast.config import list_presets

SUBCOMMANDS = {
    "pretrain": "DINO-CXR self-supervised pretraining (the default when no subcommand is given)",
    "linear": "linear evaluation of a pretrained backbone on a labelled ImageFolder",
    "finetune": "fine-tune a pretrained backbone with a classifier on a labelled ImageFolder",
    "export-backbone": "write the teacher backbone of a pretraining run as safetensors (no training)",
}
DEFAULT_PRESET = "tiny_cpu"


def pretrain_parser() -> argparse.ArgumentParser:
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


def supervised_parser(command: str) -> argparse.ArgumentParser:
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


def export_backbone_parser() -> argparse.ArgumentParser:
    parser = cli_parser("python -m dinocxr_fast.train export-backbone", SUBCOMMANDS["export-backbone"] + ".")
    parser.add_argument("run", help="pretraining run folder (its latest checkpoint is read) or a checkpoint file")
    parser.add_argument("--out", help="safetensors file to write (default: RUN/teacher_backbone.safetensors)")
    return parser


# (section, key, flag attribute) of the flags that set one config key each.
PRETRAIN_FLAGS = (("data", "path", "data"), ("data", "views", "views"), ("train", "knn_data", "knn_data"),
                  ("train", "epochs", "epochs"), ("train", "max_steps", "max_steps"), ("train", "device", "device"),
                  ("optim", "batch_size", "batch_size"), ("optim", "lr", "lr"), ("dino", "backend", "backend"))
SUPERVISED_FLAGS = (("model", "pretrained", "pretrained"), ("data", "path", "data"),
                    ("data", "label_fraction", "label_fraction"), ("train", "epochs", "epochs"),
                    ("optim", "batch_size", "batch_size"), ("optim", "lr", "lr"), ("train", "device", "device"),
                    ("train", "max_steps", "max_steps"))


def flag_overrides(args: argparse.Namespace, flags=PRETRAIN_FLAGS) -> dict:
    """The config overrides the given flags ask for (flags left out set nothing)."""
    over: dict = {}
    for section, key, attribute in flags:
        value = getattr(args, attribute, None)
        if value is not None:
            over.setdefault(section, {})[key] = value
    return over
