"""``python -m dinocxr_fast.infer IMAGES_OR_DIR --model model.plan|model.onnx|classifier.pt``

Batch inference with the evaluation preprocessing (DALI, or the PIL fallback), through TensorRT,
ONNX Runtime or PyTorch. Writes a CSV: file, status, predicted class, one probability column per
class; unreadable files get a row with their error and the run goes on. ``--attention-maps DIR``
writes DINO-style self-attention overlays (per head and their mean) from the torch model.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dinocxr_fast.artefact import metadata_for, read_metadata, tensorrt_available
from dinocxr_fast import cli
from dinocxr_fast.cli import parser as cli_parser
from dinocxr_fast.runtime.run_log import Progress, print_startup

# torch and the data package are imported where they are used: `infer --help` answers at once

BACKEND_BY_SUFFIX = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnxruntime", ".pt": "torch"}


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Every input gets a row: images under folders as the loaders find them (hidden entries
    skipped, symlink loops read once, links to nothing listed so their row says so)."""
    from dinocxr_fast.data.sources import IMAGE_EXTENSIONS, scan_images  # noqa: PLC0415

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


def eval_config_from(meta: dict):
    from dinocxr_fast.data import EvalConfig  # noqa: PLC0415

    i = meta["input"]
    return EvalConfig(resize=int(i["resize"]), crop=int(i["size"]), mean=float(i["mean"]), std=float(i["std"]),
                      channels=int(i["channels"]), interpolation=i.get("interpolation", "bicubic"))


def preprocess_batches(files: list[str], meta: dict, batch_size: int, device, loader: str = "auto"):
    """(indices into files, images) per batch, and the loader (its .skipped names the bad files)."""
    from dinocxr_fast.data import Sample, Source, build_labelled_loader  # noqa: PLC0415
    from dinocxr_fast.runtime import data_setup  # noqa: PLC0415

    source = Source([Sample(f, 0, None) for f in files], ["_"], root="inference inputs")
    dl = build_labelled_loader(source, eval_config_from(meta), batch_size, device=device,
                           backend=data_setup.loader_backend({"loader": loader}), num_threads=2)
    return dl


def load_images_for_model(folder: str, meta: dict) -> tuple[torch.Tensor, list[str]]:
    """Every readable image of ``folder`` preprocessed for the model (INT8 calibration)."""
    import torch  # noqa: PLC0415

    files = collect_images([folder])
    dl = preprocess_batches(files, meta, 32, "cpu")
    try:
        images = [x for x, _ in dl]
    finally:
        dl.close()
    return torch.cat(images), files


# ---- runners: images [B, C, S, S] float32 -> logits [B, K] numpy ------------------------------
def torch_runner(checkpoint: Path, device) -> tuple[Callable, dict, torch.nn.Module]:
    import torch  # noqa: PLC0415

    from dinocxr_fast.classifier import load_classifier  # noqa: PLC0415

    model, record = load_classifier(checkpoint, device)
    meta = metadata_for(record)

    @torch.no_grad()
    def run(images: torch.Tensor) -> np.ndarray:
        return model(images.to(device)).float().cpu().numpy()

    return run, meta, model


def onnxruntime_runner(path: Path) -> tuple[Callable, dict]:
    import onnxruntime as ort  # noqa: PLC0415

    meta = read_metadata(path)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name
    meta = {**meta, "providers": session.get_providers()}

    def run(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: images.cpu().numpy().astype(np.float32)})[0]

    return run, meta


def tensorrt_runner(path: Path) -> tuple[Callable, dict]:
    reason = tensorrt_available()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt  # noqa: PLC0415
    import torch  # noqa: PLC0415

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
def whole_image_input(path: str, meta: dict):
    """(model input [1, C, S, S], the radiograph as a float array in 0..1): the whole image resized
    to the model's input size, not the evaluation centre crop, so no part of the lungs is cut off."""
    import torch  # noqa: PLC0415

    from dinocxr_fast.data.imageio import decode_pil, load_encoded  # noqa: PLC0415

    i = meta["input"]
    size, channels = int(i["size"]), int(i["channels"])
    image = np.asarray(decode_pil(load_encoded(path)[0]), dtype=np.float32) / 255.0
    x = torch.from_numpy(image)[None, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = ((x - float(i["mean"])) / float(i["std"])).expand(1, channels, size, size).contiguous()
    return x, image


ATTENTION_CAPTION = ("attention each location receives in the last block's self-attention, averaged over all "
                     "query tokens (the model has no class token); whole radiograph resized to the model input")


def attention_overlays(model: torch.nn.Module, files: list[str], meta: dict, out_dir: Path, limit: int = 16) -> list[Path]:
    """For each image: how much attention each location of the last block receives (mean over
    queries), averaged over heads (with a colour bar) and per head, over the whole radiograph;
    titled with the file name, the prediction and its probability."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import torch  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(meta["classes"])
    device = next(model.parameters()).device
    written = []
    for path in files[:limit]:
        x, xray = whole_image_input(path, meta)
        with torch.no_grad():
            probs = torch.softmax(model(x.to(device)).float(), 1)[0].cpu().numpy()
            attn = model.backbone.get_last_selfattention(x.to(device)).float().cpu()
        if attn.dim() != 4:
            raise RuntimeError("attention maps need full attention in the last stage")
        heads, side = attn.shape[1], x.shape[2] // 32
        received = attn[0].mean(1).reshape(heads, side, side)  # mean over queries
        up = torch.nn.functional.interpolate(received[None], size=xray.shape, mode="bilinear", align_corners=False)[0]
        maps = [up.mean(0).numpy()] + [up[h].numpy() for h in range(heads)]
        titles = ["mean of heads"] + [f"head {h}" for h in range(heads)]
        fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.0 * (len(maps) + 1) + 0.6, 2.9), dpi=90)
        axes[0].imshow(xray, cmap="gray")
        axes[0].set_title("input", fontsize=8)
        for k, (ax, m, title) in enumerate(zip(axes[1:], maps, titles)):
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            ax.imshow(xray, cmap="gray")
            shown = ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            if k == 0:
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
                bar.set_label("attention received (min-max scaled)", fontsize=6)
                bar.ax.tick_params(labelsize=6)
        for ax in axes:
            ax.axis("off")
        top = int(probs.argmax())
        fig.suptitle(f"{Path(path).name}: predicted {classes[top]} (p = {probs[top]:.3f})", fontsize=9)
        fig.text(0.5, 0.02, ATTENTION_CAPTION, ha="center", fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.06, 1, 0.93))
        target = out_dir / f"{Path(path).stem}_attention.png"
        fig.savefig(target)
        plt.close(fig)
        written.append(target)
    return written


def inference_startup(args, files: list[str], meta: dict, model, backend: str, device) -> list[tuple[str, object]]:
    """The start-up block's lines; with the PyTorch model, the fused ops' backends are planned
    for its forward at the batch and input size (runtime/backends.py)."""
    from dinocxr_fast.runtime import backends  # noqa: PLC0415
    from dinocxr_fast.runtime import data_setup  # noqa: PLC0415

    i = meta["input"]
    batch = min(int(args.batch_size), len(files))
    if model is not None:
        ops = backends.plan(lambda: backends.model_calls(model, batch=batch, channels=int(i["channels"]),
                                                         size=int(i["size"]), device=device), device).summary
        runs_on = f"{device}, fp32"
    elif backend == "onnxruntime":  # preprocessing on the CPU, the graph where ONNX Runtime puts it
        ops = "none of ours: ONNX Runtime runs the exported graph (standard ONNX nodes only)"
        runs_on = f"ONNX Runtime {', '.join(meta.get('providers', []))}"
    else:
        ops = "none of ours: TensorRT runs the engine built from the exported graph"
        runs_on = "cuda (TensorRT)"
    return [("output", Path(args.out)), ("model", f"{args.model} ({backend}; {meta.get('arch', '?')}, classes "
                                                  f"{list(meta['classes'])})"),
            ("device", runs_on), ("loader", data_setup.loader_backend({"loader": args.loader})),
            ("data", f"{len(files)} images from {', '.join(args.inputs)}"),
            ("backends", ops),
            ("work", f"{-(-len(files) // int(args.batch_size))} batches of {args.batch_size} at {i['size']} px"
                     + (f"; then attention overlays of the first 16 into {args.attention_maps}" if args.attention_maps else ""))]


def _infer(args, out: Path, backend: str) -> None:
    """Classify the inputs into the CSV ``out`` (and the attention overlays) the command line asks for."""
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415 - loads torch; --help must not

    device = distributed.device_from(args.device)
    files = collect_images(args.inputs)
    runner, meta, model = make_runner(args.model, args.backend, device)
    if not args.quiet:
        print_startup("inference", inference_startup(args, files, meta, model, backend, device))
    summary = run_inference(files, runner, meta, out, batch_size=args.batch_size, loader=args.loader,
                            device=device, show_progress=not args.quiet)
    print(f"wrote {args.out}: {summary['ok']} of {summary['images']} images classified, "
          f"{summary['errors']} unreadable (listed in the CSV)")
    if args.attention_maps:
        written = attention_overlays(model, [f for f in files if Path(f).is_file()], meta, Path(args.attention_maps))
        print(f"wrote {len(written)} attention overlays to {args.attention_maps}")


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m dinocxr_fast.infer", __doc__.split("\n\n")[1].strip())
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively, hidden files skipped)")
    parser.add_argument("--model", required=True, help="model.plan (TensorRT: needs a GPU and tensorrt), model.onnx "
                        "(ONNX Runtime), or classifier.pt / its run folder (PyTorch)")
    parser.add_argument("--backend", choices=("tensorrt", "onnxruntime", "torch"), help="default: from the file suffix")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write; an existing file is kept unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out CSV")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"),
                        help="image decoding: DALI, the PIL/torch DataLoader, or DALI when installed")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    parser.add_argument("--attention-maps", metavar="DIR", help="also write attention overlays of the first 16 images "
                        "here; needs the PyTorch model (--model classifier.pt or its run folder)")
    parser.add_argument("--quiet", action="store_true", help="no start-up block and no progress display")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # refuse what cannot work before any work, one line each
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        return cli.user_error(f"{out} exists; pass --overwrite to replace it or choose another --out")
    model_path = Path(args.model)
    backend = args.backend or ("torch" if model_path.is_dir() else BACKEND_BY_SUFFIX.get(model_path.suffix))
    if args.attention_maps and backend != "torch":
        return cli.user_error(f"--attention-maps needs the PyTorch model (--model classifier.pt or its run folder), "
                              f"not {args.model} ({backend}); nothing was written")
    return cli.run(_infer, args, out, backend)


if __name__ == "__main__":
    sys.exit(main())
