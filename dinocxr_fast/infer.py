"""``python -m dinocxr_fast.infer IMAGES_OR_DIR --model model.plan|model.onnx|classifier.pt``

Batch inference with the evaluation preprocessing (DALI, or the PIL fallback), through TensorRT,
ONNX Runtime or PyTorch. Writes a CSV: file, status, predicted class, one probability column per
class; unreadable files get a row with their error and the run goes on. ``--attention-maps DIR``
writes DINO-style self-attention overlays (per head and their mean) from the torch model.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dinocxr_fast.data import EvalConfig, Sample, Source, build_eval_loader
from dinocxr_fast.data.sources import IMAGE_EXTENSIONS, scan_images
from dinocxr_fast.runtime.metrics import Progress

BACKEND_BY_SUFFIX = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnxruntime", ".pt": "torch"}


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Every input gets a row: images under folders as the loaders find them (hidden entries
    skipped, symlink loops read once, links to nothing listed so their row says so)."""
    files: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += scan_images(p, IMAGE_EXTENSIONS)
        else:
            files.append(str(p))  # a missing or unreadable file is reported in the CSV
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(inputs)}")
    return files


def eval_config_from(meta: dict) -> EvalConfig:
    i = meta["input"]
    return EvalConfig(resize=int(i["resize"]), crop=int(i["size"]), mean=float(i["mean"]), std=float(i["std"]),
                      channels=int(i["channels"]), interpolation=i.get("interpolation", "bicubic"))


def preprocess_batches(files: list[str], meta: dict, batch_size: int, device, loader: str = "auto"):
    """(indices into files, images) per batch, and the loader (its .skipped names the bad files)."""
    from dinocxr_fast.runtime import data as data_setup  # noqa: PLC0415

    source = Source([Sample(f, 0, None) for f in files], ["_"], root="inference inputs")
    dl = build_eval_loader(source, eval_config_from(meta), batch_size, device=device,
                           backend=data_setup.loader_backend({"loader": loader}), num_threads=2)
    return dl


def load_images_for_model(folder: str, meta: dict) -> tuple[torch.Tensor, list[str]]:
    """Every readable image of ``folder`` preprocessed for the model (INT8 calibration)."""
    files = collect_images([folder])
    dl = preprocess_batches(files, meta, 32, "cpu")
    try:
        images = [x for x, _ in dl]
    finally:
        dl.close()
    return torch.cat(images), files


# ---- runners: images [B, C, S, S] float32 -> logits [B, K] numpy ------------------------------
def torch_runner(checkpoint: Path, device) -> tuple[Callable, dict, torch.nn.Module]:
    from dinocxr_fast.classifier import load_classifier  # noqa: PLC0415

    model, record = load_classifier(checkpoint, device)
    e = record["eval"]
    meta = {"input": {"channels": record["model"]["in_chans"], "size": e["crop"], "resize": e["resize"],
                      "mean": e["mean"], "std": e["std"], "interpolation": e.get("interpolation", "bicubic")},
            "classes": record["classes"], "output": "logits"}

    @torch.no_grad()
    def run(images: torch.Tensor) -> np.ndarray:
        return model(images.to(device)).float().cpu().numpy()

    return run, meta, model


def onnxruntime_runner(path: Path) -> tuple[Callable, dict]:
    import onnxruntime as ort  # noqa: PLC0415

    from dinocxr_fast.export import read_metadata  # noqa: PLC0415

    meta = read_metadata(path)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: images.cpu().numpy().astype(np.float32)})[0]

    return run, meta


def tensorrt_runner(path: Path) -> tuple[Callable, dict]:
    from dinocxr_fast.export import read_metadata, tensorrt_available  # noqa: PLC0415

    reason = tensorrt_available()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt  # noqa: PLC0415

    meta = read_metadata(path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {path} (built for another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = torch.cuda.Stream()

    def run(images: torch.Tensor) -> np.ndarray:
        x = images.to("cuda", torch.float32).contiguous()
        context.set_input_shape(input_name, tuple(x.shape))
        out = torch.empty(tuple(context.get_tensor_shape(output_name)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(input_name, x.data_ptr())
        context.set_tensor_address(output_name, out.data_ptr())
        stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    return run, meta


def make_runner(model_path: str | Path, backend: str | None, device) -> tuple[Callable, dict, torch.nn.Module | None]:
    path = Path(model_path)
    if path.is_dir():
        path = path / "classifier.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--model {model_path}: no such file")
    backend = backend or BACKEND_BY_SUFFIX.get(path.suffix)
    if backend is None:
        raise ValueError(f"cannot tell the backend of {path}; pass --backend tensorrt|onnxruntime|torch")
    if backend == "torch":
        return torch_runner(path, device)
    if backend == "onnxruntime":
        return (*onnxruntime_runner(path), None)
    if backend == "tensorrt":
        return (*tensorrt_runner(path), None)
    raise ValueError(f"unknown backend {backend!r}")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def run_inference(files: list[str], runner: Callable, meta: dict, out_csv: Path, *, batch_size: int = 32,
                  loader: str = "auto", device="cpu", show_progress: bool = True) -> dict:
    classes = list(meta["classes"])
    rows: dict[int, list] = {}
    dl = preprocess_batches(files, meta, batch_size, device if device != "cuda" else "cpu", loader)
    progress = Progress(len(dl), enabled=show_progress)
    try:
        for step, (images, _) in enumerate(dl, start=1):
            probs = softmax(runner(images))
            for i, p in zip(dl.batch_indices, probs):
                rows[int(i)] = [files[i], "ok", classes[int(p.argmax())], *(f"{v:.6f}" for v in p)]
            progress.update(step, {"images": str(len(rows))})
        skipped = dl.skipped
    finally:
        progress.close()
        dl.close()
    index = {f: i for i, f in enumerate(files)}
    for path, reason in skipped.items():
        if path in index:
            rows[index[path]] = [path, f"error: {reason}", "", *([""] * len(classes))]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "status", "predicted", *(f"p_{c}" for c in classes)])
        for i in range(len(files)):
            writer.writerow(rows.get(i, [files[i], "error: not processed", "", *([""] * len(classes))]))
    return {"images": len(files), "ok": sum(r[1] == "ok" for r in rows.values()), "errors": len(skipped)}


# ---- attention maps ------------------------------------------------------------------------------
def attention_overlays(model: torch.nn.Module, files: list[str], meta: dict, out_dir: Path, limit: int = 16) -> list[Path]:
    """For each image: how much attention each location of the last block receives (mean over
    queries), per head and averaged over heads, upsampled and overlaid on the X-ray."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    dl = preprocess_batches(files[:limit], meta, 8, "cpu")
    written = []
    backbone = model.backbone
    std, mean = float(meta["input"]["std"]), float(meta["input"]["mean"])
    try:
        for images, _ in dl:
            with torch.no_grad():
                attn = backbone.get_last_selfattention(images.to(next(model.parameters()).device)).float().cpu()
            if attn.dim() != 4:
                raise RuntimeError("attention maps need full attention in the last stage")
            b, heads, n, _ = attn.shape
            side_h = images.shape[2] // 32
            side_w = images.shape[3] // 32
            received = attn.mean(2).reshape(b, heads, side_h, side_w)  # mean over queries
            up = torch.nn.functional.interpolate(received, size=images.shape[2:], mode="bilinear", align_corners=False)
            for j, idx in enumerate(dl.batch_indices):
                xray = (images[j, 0] * std + mean).clamp(0, 1).numpy()
                maps = [up[j, h].numpy() for h in range(heads)] + [up[j].mean(0).numpy()]
                titles = [f"head {h}" for h in range(heads)] + ["mean"]
                fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.4), dpi=110)
                axes[0].imshow(xray, cmap="gray")
                axes[0].set_title("input", fontsize=8)
                for ax, m, title in zip(axes[1:], maps, titles):
                    ax.imshow(xray, cmap="gray")
                    ax.imshow((m - m.min()) / (m.max() - m.min() + 1e-12), cmap="jet", alpha=0.45)
                    ax.set_title(title, fontsize=8)
                for ax in axes:
                    ax.axis("off")
                fig.tight_layout()
                path = out_dir / f"{Path(files[idx]).stem}_attention.png"
                fig.savefig(path)
                plt.close(fig)
                written.append(path)
    finally:
        dl.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinocxr_fast.infer", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--model", required=True, help="model.plan (TensorRT), model.onnx, or classifier.pt")
    parser.add_argument("--backend", choices=("tensorrt", "onnxruntime", "torch"), help="default: from the file suffix")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-maps", metavar="DIR", help="write attention overlays (torch backend)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from dinocxr_fast.runtime import data as data_setup  # noqa: PLC0415

    try:
        device = data_setup.device_from(args.device)
        files = collect_images(args.inputs)
        runner, meta, model = make_runner(args.model, args.backend, device)
        summary = run_inference(files, runner, meta, Path(args.out), batch_size=args.batch_size, loader=args.loader,
                                device=device, show_progress=not args.quiet)
        print(f"wrote {args.out}: {summary['ok']} of {summary['images']} images classified, "
              f"{summary['errors']} unreadable (listed in the CSV)")
        if args.attention_maps:
            if model is None:
                raise ValueError("--attention-maps needs the torch model (--model classifier.pt)")
            ok = [f for f in files if Path(f).is_file()]
            written = attention_overlays(model, ok, meta, Path(args.attention_maps))
            print(f"wrote {len(written)} attention overlays to {args.attention_maps}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
