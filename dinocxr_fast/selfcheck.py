"""Which fused-op backends are correct and faster on this machine: verification and timing of every op.

    python -m dinocxr_fast.selfcheck [--device cpu|cuda] [--quick] [--json PATH]

Runs a ViTAEv2 forward (ViTAEv2-S at 224 px on a GPU, in float32 and under bf16 autocast;
ViTAEv2-tiny at the CPU preset's 64 px on the CPU) and a DINO loss with the dispatch recording
every fused-op call, then verifies each custom backend at each recorded shape against the op's
reference (forward and backward, tolerance per dtype) and times it against the vendor path, as
``auto`` does before trusting a backend (ops/_dispatch.py). CUDA and Triton backends are verified
in child processes, so a crashing kernel fails its row instead of the check. Prints one table;
``--json`` writes it with the environment. Verdicts also go to the backend cache, so a training
run on this machine starts with them. ``--quick``: ViTAEv2-tiny, small batch, for CI and smoke runs.
Exit code 0 when every row was checked (refusals included), 2 when the device is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dinocxr_fast.ops import _dispatch, _verdict_cache, dino_loss

# (architecture, batch, image size, K) per device and mode
SHAPES = {
    ("cuda", False): ("vitaev2_s", 32, 224, 65536),
    ("cuda", True): ("vitaev2_tiny", 8, 64, 4096),
    ("cpu", False): ("vitaev2_tiny", 32, 64, 1024),
    ("cpu", True): ("vitaev2_tiny", 4, 64, 1024),
}
SELFCHECK_BUDGET_S = 0.5  # seconds of alternating timing per case and backend (up to 25 runs each)


def record(device: torch.device, quick: bool) -> list:
    """The fused-op calls of one model forward and one DINO loss (two views), per compute dtype."""
    from dinocxr_fast.models import create_model  # noqa: PLC0415

    arch, batch, size, k = SHAPES[(device.type, quick)]
    torch.manual_seed(0)
    model = create_model(arch).to(device).train()
    images = torch.randn(batch, 1, size, size, device=device)
    precisions = [None, torch.bfloat16] if device.type == "cuda" else [None]
    with _dispatch.recording() as calls, torch.no_grad():
        for dtype in precisions:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(images)
            student = torch.randn(2 * batch, k, device=device, dtype=dtype or torch.float32)
            dino_loss(student, student.clone(), torch.zeros(k, device=device), student_temp=0.1, teacher_temp=0.04,
                      check_finite=False)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinocxr_fast.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="ViTAEv2-tiny shapes, small batch (seconds)")
    parser.add_argument("--json", type=Path, help="also write the table and environment as JSON here")
    args = parser.parse_args(argv)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        print("selfcheck: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    device = torch.device(name)
    t0 = time.perf_counter()
    calls = record(device, args.quick)
    # A measurement, not a start-up: time each case longer than the trainer's plan does (50 ms on
    # the CPU), so choices near the 1.03x threshold stop flipping between runs.
    rows = _dispatch.plan(calls, reverify=True, check_vendor=True, time_budget_s=SELFCHECK_BUDGET_S,
                          progress=lambda m: print(f"selfcheck: {m}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    env = _verdict_cache.environment(device)
    chosen = sum(r.chosen != _dispatch.VENDOR for r in rows)
    refused = sum(len(r.refused) for r in rows)
    title = (f"selfcheck on {env['device']} (torch {env['torch']}, cuda {env['cuda']}, triton {env['triton']}): "
             f"{len(rows)} op shapes, {chosen} on a custom backend, {refused} refusals, {wall:.0f} s")
    print(_dispatch.format_table(rows, title), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "device": str(device), "quick": args.quick,
                                         "wall_s": wall, "rows": [r.as_dict() for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
