"""DINO loss: fused backends against the eager reference (facebookresearch/dino semantics).

    python -m benchmarks.bench_dino_loss [--quick] [--json PATH] [--device cpu|cuda]

K=65536; B=32 with n_crops 2 (DINO-CXR's two views) and 10 (classic multi-crop); on CUDA also B=64
with 2 and 12 crops (the design doc's step; --quick keeps only those two there), forward and
forward+backward (backward = torch.autograd.grad of the loss w.r.t. the student logits, as when the
gradient flows on into the head; .backward() into a leaf would add a copy to both sides). Peer: ``dino_loss_reference`` run eagerly in the same process. On CUDA also
torch.compile of the reference, GB/s and the fraction of peak HBM bandwidth (3.35 TB/s on an
H100), and each fused backend's time beside the others' (``cuda_ms``, ``triton_ms``), which is what
the order of ``IMPLEMENTED`` ("auto") should follow. On the CPU: the minimum traffic (student and
teacher read once, gradient written once: ~185 MB per fwd+bwd call at 10 crops) in GB/s and as a
fraction of this machine's STREAM-style bandwidth probed in the same process, for ours and the
eager peer (``frac_stream_bw``, ``eager_frac_stream_bw``). The Triton backend runs on CUDA only (on
the CPU it would be the interpreter); there the script says its figures were not measured.
Backends are named explicitly (never "auto"), so a change of the dispatch does not change a row.
"""
from __future__ import annotations

import torch

from benchmarks import _harness as H
from dinocxr_fast import ops
from dinocxr_fast.ops import _backend
from dinocxr_fast.ops.dino_loss import IMPLEMENTED

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def fused_backends(device: torch.device) -> list[str]:
    return [b for b in IMPLEMENTED[device.type] if b != "torch" and _backend.why_unavailable(b, device) is None
            and not (b == "triton" and device.type != "cuda")]


def bytes_touched(n_crops: int, batch: int, k: int, elem: int, backward: bool) -> int:
    """Minimum traffic: read student and teacher once, write the gradient once."""
    student, teacher = n_crops * batch * k * elem, 2 * batch * k * elem
    return student + teacher + (student if backward else 0)


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    k = 65536
    if device.type == "cuda":
        shapes = [(64, 2), (64, 12)] if args.quick else [(32, 2), (32, 10), (64, 2), (64, 12)]
    else:
        shapes = [(32, 2), (32, 10)]
        H.print_bandwidth()
        print("The Triton DINO loss needs a CUDA GPU: its GB/s and fraction of HBM bandwidth were NOT measured "
              "on this machine.")
    records = []
    for batch, n_crops in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        student = torch.randn(n_crops * batch, k, generator=gen).to(device, dtype).requires_grad_()
        teacher = torch.randn(2 * batch, k, generator=gen).to(device, dtype)
        center = torch.zeros(k, device=device)

        # forward rows: the loss alone (no gradient); fwd_bwd rows: the loss and its gradient
        def reference(backward: bool):
            with torch.set_grad_enabled(backward):
                loss = ops.dino_loss_reference(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
            if backward:
                torch.autograd.grad(loss, student)

        peers = {"eager": reference}
        if device.type == "cuda":
            compiled = torch.compile(ops.dino_loss_reference)

            def reference_compiled(backward: bool):
                with torch.set_grad_enabled(backward):
                    loss = compiled(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
                if backward:
                    torch.autograd.grad(loss, student)

            peers["torch.compile"] = reference_compiled

        for backward in (False, True):
            contenders = {f"peer:{name}": (lambda f=f: f(backward)) for name, f in peers.items()}
            for backend in fused_backends(device):
                def fused(backend=backend):
                    with torch.set_grad_enabled(backward):
                        loss = ops.dino_loss(student, teacher, center, student_temp=STUDENT_TEMP,
                                             teacher_temp=TEACHER_TEMP, backend=backend, check_finite=False)
                    if backward:
                        torch.autograd.grad(loss, student)

                contenders[backend] = fused
            # round-robin, so a change of load hits ours and the peer alike
            times = H.time_interleaved(contenders, device, repeats=9 if device.type == "cpu" else 20)
            peer_ms = {name.removeprefix("peer:"): t for name, t in times.items() if name.startswith("peer:")}
            fused_ms = {name: t for name, t in times.items() if not name.startswith("peer:")}
            best_peer = min(peer_ms, key=peer_ms.get)
            for backend, ms in fused_ms.items():
                extra = {"eager_ms": round(peer_ms["eager"], 3)}
                extra.update({f"{b}_ms": round(t, 4) for b, t in fused_ms.items() if b != backend})
                nbytes = bytes_touched(n_crops, batch, k, student.element_size(), backward)
                if device.type == "cpu":
                    extra.update(H.bandwidth_extra(nbytes, ms))
                    extra["eager_frac_stream_bw"] = H.bandwidth_extra(nbytes, peer_ms["eager"])["frac_stream_bw"]
                if device.type == "cuda":
                    extra["GB/s"] = round(nbytes / ms / 1e6, 1)
                    peaks = H.gpu_peaks(device)
                    if peaks:
                        extra["frac_peak_bw"] = round(nbytes / (ms * 1e-3) / peaks["bandwidth"], 3)
                records.append(H.make_record(
                    "dino_loss_fwd_bwd" if backward else "dino_loss_fwd",
                    f"n_crops={n_crops},B={batch},K={k},{str(dtype).removeprefix('torch.')}",
                    backend, best_peer, ms, peer_ms[best_peer], device, **extra,
                ))
    return records


def main() -> None:
    args = H.base_parser(__doc__).parse_args()
    records = run(args)
    H.print_table(records, extra_cols=("eager_ms", "GB/s", "frac_peak_bw", "frac_stream_bw", "eager_frac_stream_bw",
                                       "cuda_ms", "triton_ms", "cpp_ms"))
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
