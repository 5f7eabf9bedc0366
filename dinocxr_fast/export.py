"""``python -m dinocxr_fast.export --checkpoint CLASSIFIER --out model.onnx [--trt model.plan]``

ONNX export of a classifier (or its backbone features) with a dynamic batch, traced through the
reference (plain PyTorch) definitions of the fused ops so the graph holds standard ONNX nodes
only; then, optionally, a TensorRT engine built from that graph with the TensorRT Python API.

Metadata (input size, normalisation, class names, the source checkpoint's SHA-256) is written
beside each artefact as ``<name>.json``; ``infer`` reads it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from dinocxr_fast.artefact import (
    metadata_for,
    read_metadata,
    sha256_of,
    tensorrt_available,
    write_metadata,
)
from dinocxr_fast import cli
from dinocxr_fast.cli import parser as cli_parser

STANDARD_DOMAINS = ("", "ai.onnx")


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Route every fused op to its plain-PyTorch backend while tracing (DESIGN.md: export traces
    the reference path), then restore the previous choice: the process-wide choice of this process
    (an earlier --backend) and DINOCXR_BACKEND alike."""
    from dinocxr_fast.ops import _backend, _dispatch  # noqa: PLC0415

    previous = os.environ.get(_backend.ENV_VAR)
    previous_forced = _dispatch._forced
    os.environ[_backend.ENV_VAR] = "torch"
    _dispatch.set_forced("torch")
    try:
        yield
    finally:
        _dispatch.set_forced(previous_forced)
        if previous is None:
            os.environ.pop(_backend.ENV_VAR, None)
        else:
            os.environ[_backend.ENV_VAR] = previous


TRACED_BACKENDS = ("torch (the vendor path: plain PyTorch, SDPA) for every fused op while tracing; the graph holds "
                   "standard ONNX nodes only")


def export_onnx(checkpoint: str | Path, out: str | Path, *, features_only: bool = False, opset: int = 17,
                startup: list[tuple[str, object]] | None = None) -> Path:
    """``startup``: the command's own lines of the start-up block (printed with the model's, before
    the trace); None prints no block."""
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415 - after argument parsing: --help stays fast

    from dinocxr_fast.classifier import load_classifier  # noqa: PLC0415
    from dinocxr_fast.runtime.run_log import print_startup  # noqa: PLC0415

    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "classifier.pt"
    model, record = load_classifier(checkpoint, "cpu")
    module = model.backbone.eval() if features_only else model.eval()
    size = int(record["eval"]["crop"])
    if startup is not None:
        print_startup("ONNX export", [
            ("output", f"{out} (+ {out.name}.json), opset {opset}, dynamic batch"),
            ("device", "cpu, fp32 (tracing)"),
            ("model", f"{record['model']['arch']} from {checkpoint}, {int(record['model']['in_chans'])} x {size} px in, "
                      + ("backbone features out" if features_only else f"logits of {list(record['classes'])} out")),
            ("backends", TRACED_BACKENDS), *startup])
    dummy = torch.zeros(2, int(record["model"]["in_chans"]), size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_name = "features" if features_only else "logits"
    with reference_ops(), torch.no_grad():
        torch.onnx.export(module, (dummy,), str(out), input_names=["images"], output_names=[output_name],
                          dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    custom = sorted({n.op_type for n in graph.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise RuntimeError(f"exported graph {out} holds non-standard nodes {custom}; export must trace the reference ops")
    write_metadata(out, metadata_for(record, checkpoint, features_only=features_only))
    return out


# ---- TensorRT ----------------------------------------------------------------------------------
# Plain fp16 builds are known to lose ViT accuracy in LayerNorm, softmax and reductions: those
# layers are pinned to fp32 (with OBEY_PRECISION_CONSTRAINTS) while matmuls and convs run in fp16.
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


def build_tensorrt(onnx_path: str | Path, plan_path: str | Path, *, precision: str = "fp16", max_batch: int = 64,
                   opt_batch: int = 16, timing_cache: str | Path | None = None, calibration_images=None,
                   workspace_gb: float = 4.0) -> Path:
    reason = tensorrt_available()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt  # noqa: PLC0415

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    meta = read_metadata(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    c, s = meta["input"]["channels"], meta["input"]["size"]
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, c, s, s), (opt_batch, c, s, s), (max_batch, c, s, s))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    if precision == "int8":
        if calibration_images is None:
            raise ValueError("INT8 needs calibration images (--calibration DIR)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _EntropyCalibrator(calibration_images, plan_path.with_suffix(".calib"))
        config.set_calibration_profile(profile)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_metadata(plan_path, {**meta, "precision": precision, "max_batch": max_batch,
                               "onnx_sha256": sha256_of(onnx_path)})
    return plan_path


def _EntropyCalibrator(images, cache_path: Path):  # noqa: N802 - a class factory: tensorrt is optional
    import tensorrt as trt  # noqa: PLC0415
    import torch  # noqa: PLC0415

    class Calibrator(trt.IInt8EntropyCalibrator2):
        """Feeds preprocessed image batches (a float tensor [N, C, S, S]) in chunks of 16."""

        def __init__(self):
            super().__init__()
            self.batches = list(torch.as_tensor(images).float().split(16))
            self.index = 0
            self.device_buffer = None

        def get_batch_size(self):
            return int(self.batches[0].shape[0]) if self.batches else 1

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            self.device_buffer = self.batches[self.index].cuda().contiguous()
            self.index += 1
            return [int(self.device_buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return Calibrator()


def _build_engine(args, onnx_path: Path) -> Path:
    """The TensorRT engine ``--trt`` asks for, calibrated on ``--calibration`` images for INT8."""
    calib = None
    if args.precision == "int8":
        from dinocxr_fast.infer import load_images_for_model  # noqa: PLC0415 - loads torch; --help must not

        calib, _ = load_images_for_model(args.calibration, read_metadata(onnx_path))
    return build_tensorrt(onnx_path, args.trt, precision=args.precision, max_batch=args.max_batch,
                          timing_cache=args.timing_cache or Path(args.trt).with_suffix(".timing-cache"),
                          calibration_images=calib)


def _export(args) -> None:
    """The ONNX file (and the TensorRT engine) the command line asks for."""
    startup = [("work", "trace, onnx.checker" + (f", then a TensorRT {args.precision} engine {args.trt} (batch 1.."
                                                  f"{args.max_batch}; minutes on a GPU)" if args.trt else ""))]
    onnx_path = export_onnx(args.checkpoint, args.out, features_only=args.features, opset=args.opset,
                            startup=None if args.quiet else startup)
    print(f"wrote {onnx_path} and {onnx_path}.json (onnx.checker passed; standard nodes only)")
    if args.trt:
        plan = _build_engine(args, onnx_path)
        print(f"wrote {plan} ({args.precision}, batch 1..{args.max_batch})")


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m dinocxr_fast.export", __doc__.split("\n\n")[1].strip())
    parser.add_argument("--checkpoint", required=True, help="classifier.pt (from train finetune / linear) or its run folder")
    parser.add_argument("--out", required=True, help="ONNX file to write (metadata beside it as <file>.json)")
    parser.add_argument("--features", action="store_true", help="export the backbone features instead of the logits")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--trt", metavar="PLAN", help="also build a TensorRT engine here (needs a CUDA GPU and the "
                        "tensorrt package; checked before any work)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"),
                        help="TensorRT precision (--trt only); int8 needs --calibration")
    parser.add_argument("--max-batch", type=int, default=64, help="TensorRT: largest batch of the engine's profile")
    parser.add_argument("--timing-cache", help="TensorRT timing cache file, reused across builds; "
                        "default: PLAN with the suffix .timing-cache")
    parser.add_argument("--calibration", help="INT8: a folder of images for calibration (--precision int8)")
    parser.add_argument("--quiet", action="store_true", help="no start-up block")
    args = parser.parse_args(argv)
    # options that cannot work are refused before the ONNX export, in one line
    problem = None
    if args.trt:
        problem = tensorrt_available()
        if problem is None and args.precision == "int8" and not args.calibration:
            problem = "--precision int8 needs --calibration DIR"
    if problem:
        return cli.user_error(f"--trt {args.trt}: {problem}; nothing was written")
    return cli.run(_export, args)


if __name__ == "__main__":
    sys.exit(main())
