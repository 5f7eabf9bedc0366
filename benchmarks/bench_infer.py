"""Inference: latency at batch 1 and throughput at batch 64, in one process.

    python -m benchmarks.bench_infer [--quick] [--json PATH] [--device cpu|cuda] [--arch A] [--size S]

Backends: torch eager, torch.compile, ONNX Runtime (CPU provider here), TensorRT fp16 (GPU, when
tensorrt is installed). The ratio column is the torch-eager time over each backend's time (above
1: faster than eager). Default model: vitaev2_tiny at 224 px on the CPU, vitaev2_s on a GPU.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks import _harness as H
from dinocxr_fast import artefact, export
from dinocxr_fast.classifier import build_classifier, classifier_record, save_classifier
from dinocxr_fast.data import EvalConfig


def make_classifier(arch: str, size: int, folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_classifier(arch, 1, 2)
    record = classifier_record(model, arch=arch, in_chans=1, classes=["normal", "pneumonia"],
                               eval_cfg=EvalConfig.for_size(size).to_dict())
    return save_classifier(record, folder / "classifier.pt")


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    arch = args.arch or ("vitaev2_s" if device.type == "cuda" else "vitaev2_tiny")
    size = args.size
    batches = (1, 16) if args.quick and device.type == "cpu" else (1, 64)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt_path = make_classifier(arch, size, tmp)
        from dinocxr_fast.classifier import load_classifier  # noqa: PLC0415

        model, _ = load_classifier(ckpt_path, device)
        onnx_path = export.export_onnx(ckpt_path, tmp / "model.onnx")
        import onnxruntime as ort  # noqa: PLC0415

        providers = ["CUDAExecutionProvider"] if device.type == "cuda" and \
            "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(onnx_path), providers=providers)
        compiled = torch.compile(model) if not args.no_compile else None
        trt_run = None
        reason = artefact.tensorrt_available()
        if reason is None:
            from dinocxr_fast.infer import tensorrt_runner  # noqa: PLC0415

            plan = export.build_tensorrt(onnx_path, tmp / "model.plan", precision="fp16", max_batch=max(batches))
            trt_run, _ = tensorrt_runner(plan)
        else:
            print(f"TensorRT not measured: {reason}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        for batch in batches:
            x = torch.randn(batch, 1, size, size, device=device)
            x_np = x.cpu().numpy()

            def eager():
                with torch.no_grad(), autocast:
                    model(x)

            backends = {"torch eager": eager}
            if compiled is not None:
                def comp():
                    with torch.no_grad(), autocast:
                        compiled(x)
                backends["torch.compile"] = comp
            backends[f"onnxruntime ({providers[0].removesuffix('ExecutionProvider')})"] = lambda: session.run(None, {"images": x_np})
            if trt_run is not None:
                backends["tensorrt fp16"] = lambda: trt_run(x)
            times = {name: H.time_fn(fn, device, repeats=7 if args.quick else 15) for name, fn in backends.items()}
            for name, ms in times.items():
                records.append(H.make_record(
                    "infer_latency" if batch == 1 else "infer_throughput", f"{arch},{size}px,batch={batch}",
                    name, "torch eager", ms, times["torch eager"], device,
                    images_per_s=round(batch / ms * 1e3, 1)))
    return records


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--arch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    records = run(args)
    H.print_table(records, extra_cols=("images_per_s",))
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
