"""Our pretraining step beside facebookresearch/dino's own, same machine, same process.

    python -m benchmarks.bench_dino_reference --dino-repo PATH [--quick] [--json PATH] [--device cpu|cuda]
                                              [--arch A] [--batch B] [--size S] [--steps N]

PATH is a checkout of https://github.com/facebookresearch/dino (main_dino.py, utils.py,
vision_transformer.py are read from it; none of its code is in this repository). Its training
iteration is train_one_epoch's body run on its own objects: ViT-S/16 (drop path 0.1) in
``utils.MultiCropWrapper`` with ``DINOHead(384, 65536)``, the student in DistributedDataParallel
over a one-process group (as main_dino.py runs on one GPU), its ``DINOLoss`` (whose centre update
all-reduces), AdamW over ``utils.get_params_groups``, ``utils.clip_gradients(3.0)``,
``utils.cancel_gradients_last_layer``, fp16 autocast + GradScaler on a GPU (its default
``--use_fp16``), fp32 on the CPU, the EMA loop over parameters and the ``loss.item()`` check. Two
global crops of ``--size`` px only (the DINO-CXR setting: no local crops), batch ``--batch``.

Ours: a PretrainJob with every op on ``auto`` (the fused backends), the DINO-CXR preset
(``--arch``, default vitaev2_s, K=65536, two views), bf16 on a GPU. The two steps are timed
round-robin; the figure of merit is images/s of each. The models differ (ViTAEv2-S has a
convolutional branch and 2x ViT-S/16's FLOPs at 224 px), so both GFLOP per step are printed too.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import _harness as H
from benchmarks.bench_train import step_flops, sync
from dinocxr_fast.config import load_config
from dinocxr_fast.trainer.pretrain import PretrainJob


def import_reference(repo: Path):
    """main_dino, utils and vision_transformer from a facebookresearch/dino checkout.

    main_dino.py imports torchvision for its data pipeline, which this step does not use; when
    torchvision is not installed an empty stand-in satisfies those imports.
    """
    for name in ("main_dino.py", "utils.py", "vision_transformer.py"):
        if not (repo / name).is_file():
            raise SystemExit(f"--dino-repo {repo}: {name} not found (expected a facebookresearch/dino checkout)")
    try:
        import torchvision  # noqa: F401, PLC0415
    except ImportError:
        stub = types.ModuleType("torchvision")
        for sub in ("datasets", "transforms", "models"):
            module = types.ModuleType(f"torchvision.{sub}")
            setattr(stub, sub, module)
            sys.modules[f"torchvision.{sub}"] = module
        sys.modules["torchvision"] = stub
    sys.path.insert(0, str(repo))
    import main_dino  # noqa: PLC0415
    import utils  # noqa: PLC0415
    import vision_transformer  # noqa: PLC0415
    return main_dino, utils, vision_transformer


def init_single_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


class ReferenceStep:
    """facebookresearch/dino's training iteration with its default ViT-S/16 hyper-parameters."""

    def __init__(self, repo: Path, device: torch.device, batch: int, size: int):
        main_dino, utils, vits = import_reference(repo)
        self.utils, self.device = utils, device
        init_single_process_group(device)
        student = vits.vit_small(patch_size=16, drop_path_rate=0.1)
        teacher = vits.vit_small(patch_size=16)
        embed_dim = student.embed_dim
        student = utils.MultiCropWrapper(student, main_dino.DINOHead(embed_dim, 65536, use_bn=False,
                                                                     norm_last_layer=True))
        teacher = utils.MultiCropWrapper(teacher, main_dino.DINOHead(embed_dim, 65536, use_bn=False))
        student, teacher = student.to(device), teacher.to(device)
        self.student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index or 0] if device.type == "cuda" else None)
        self.teacher = teacher
        teacher.load_state_dict(self.student.module.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        self.dino_loss = main_dino.DINOLoss(65536, 2, 0.04, 0.04, 0, 100).to(device)
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(self.student))
        self.fp16_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.lr, self.wd, self.momentum = 5e-4 * batch / 256, 0.04, 0.996
        gen = torch.Generator().manual_seed(0)
        self.images = [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(2)]
        self.epoch = 0

    def forward(self):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16_scaler is not None):
            teacher_output = self.teacher(self.images[:2])
            student_output = self.student(self.images)
            return self.dino_loss(student_output, teacher_output, self.epoch)

    def step(self) -> None:
        utils = self.utils
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr
            if i == 0:
                group["weight_decay"] = self.wd
        loss = self.forward()
        if not torch.isfinite(loss).item():  # the reference's math.isfinite(loss.item())
            raise RuntimeError("reference loss is not finite")
        self.optimizer.zero_grad()
        if self.fp16_scaler is None:
            loss.backward()
            utils.clip_gradients(self.student, 3.0)
            utils.cancel_gradients_last_layer(self.epoch, self.student, 1)
            self.optimizer.step()
        else:
            self.fp16_scaler.scale(loss).backward()
            self.fp16_scaler.unscale_(self.optimizer)
            utils.clip_gradients(self.student, 3.0)
            utils.cancel_gradients_last_layer(self.epoch, self.student, 1)
            self.fp16_scaler.step(self.optimizer)
            self.fp16_scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.module.parameters(), self.teacher.parameters()):
                param_k.data.mul_(self.momentum).add_((1 - self.momentum) * param_q.detach().data)

    def flops(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

        counter = FlopCounterMode(display=False)
        with counter:
            self.forward().backward()
        self.optimizer.zero_grad()
        return float(counter.get_total_flops())


def ours(args, device: torch.device, tmp: Path) -> tuple[PretrainJob, list]:
    sets = [f"train.device={device.type}", "dino.backend=auto", f"model.arch={args.arch}",
            f"optim.batch_size={args.batch}", f"data.view_size={args.size}", "train.epochs=1000",
            "train.loss_check_every=1000000", "data.synthetic_count=256", "data.synthetic_size=256",
            "optim.freeze_last_layer_epochs=0", "data.num_workers=2"]
    if device.type == "cuda":
        sets.append("data.loader=torch")
    job = PretrainJob(load_config("dino_cxr_vitaev2_s", sets=sets), tmp / "ours", show_progress=False)
    job.loader.set_epoch(0)
    it = iter(job.loader)
    cached = [next(it) for _ in range(min(2, len(job.loader)))]
    return job, cached


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    args.batch = args.batch or (64 if device.type == "cuda" else 16)
    args.size = args.size or (224 if device.type == "cuda" else 128)
    args.steps = args.steps or (20 if device.type == "cuda" else (3 if args.quick else 7))
    torch.manual_seed(0)
    reference = ReferenceStep(Path(args.dino_repo), device, args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        job, cached = ours(args, device, Path(tmp))
        try:
            state = {"i": 0}

            def our_step():
                job.train_step(cached[state["i"] % len(cached)])
                state["i"] += 1
                sync(device)

            def reference_step():
                reference.step()
                sync(device)

            times = H.time_interleaved({"ours": our_step, "reference": reference_step}, device, repeats=args.steps)
            our_flops, ref_flops = step_flops(job, cached[0]), reference.flops()
        finally:
            job.close()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    ours_ips, ref_ips = args.batch / times["ours"] * 1e3, args.batch / times["reference"] * 1e3
    print(f"ours ({args.arch}, fused): {times['ours']:.1f} ms/step, {ours_ips:.1f} img/s, "
          f"{our_flops / 1e9:.1f} GFLOP/step")
    print(f"facebookresearch/dino (vit_small/16): {times['reference']:.1f} ms/step, {ref_ips:.1f} img/s, "
          f"{ref_flops / 1e9:.1f} GFLOP/step")
    shape = f"B={args.batch},{args.size}px,2 views"
    return [H.make_record("pretrain_step_vs_dino_reference", shape, f"ours {args.arch} (auto)",
                          "facebookresearch/dino vit_small/16", times["ours"], times["reference"], device,
                          images_per_s=round(ours_ips, 1), peer_images_per_s=round(ref_ips, 1),
                          gflops_per_step=round(our_flops / 1e9, 1), peer_gflops_per_step=round(ref_flops / 1e9, 1))]


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--dino-repo", required=True, help="a checkout of facebookresearch/dino")
    parser.add_argument("--arch", default="vitaev2_s")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    records = run(args)
    H.print_table(records, extra_cols=("images_per_s", "peer_images_per_s", "gflops_per_step", "peer_gflops_per_step"))
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
