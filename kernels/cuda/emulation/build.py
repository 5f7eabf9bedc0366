"""Build the kernels of kernels/cuda as a CPU shared library on simt.h (the emulation harness).

    python kernels/cuda/emulation/build.py [--sanitize] [--out DIR]

The .cu sources are used as they are, with two mechanical rewrites a host compiler needs: kernel
launches ``k<<<grid, block, smem, stream>>>(args)`` become ``emu::launch(k, grid, block, smem,
stream, args)`` and ``extern __shared__ ... name[];`` becomes a pointer to the block's dynamic
shared memory. Compiled as C++20 with __CUDA_ARCH__ = 900 (sm_90a features on) and
DINOCXR_CUDA_EMULATION, so every kernel body, the tensor-core ones included, is built, with the
warp-level instructions going to simt.h's emulation. ``--sanitize`` adds AddressSanitizer and
UBSan (load the library with libasan preloaded); ``--tsan`` ThreadSanitizer instead (libtsan
preloaded): every CUDA thread is a std::thread and __syncthreads a std::barrier, so a shared-memory
access missing its barrier is a reported data race. ``--race-check`` builds race_check.cpp with
ThreadSanitizer into an executable (TSan cannot be preloaded into Python with torch) and runs it.
Prints the library (or executable) path.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(?P<cfg>.*?)>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")


def split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def rewrite(src: str) -> str:
    def launch(m):
        cfg = split_top(m.group("cfg"))
        cfg += ["0", "nullptr"][len(cfg) - 2:] if len(cfg) < 4 else []
        return f"::emu::launch({m.group('kernel')}, {', '.join(cfg)}, "

    src = LAUNCH.sub(launch, src)
    return EXTERN_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_smem();", src)


def build(out_dir: Path, sanitize: bool, tsan: bool = False, exe: bool = False) -> Path:
    sources = sorted(KERNELS.glob("*.cu")) + [HERE / "driver.cpp"] + ([HERE / "race_check.cpp"] if exe else [])
    headers = sorted(KERNELS.glob("*.cuh")) + sorted(HERE.glob("*.h")) + sorted((HERE / "include").glob("*.h"))
    digest = hashlib.sha256()
    for f in sources + headers + [Path(__file__)]:
        digest.update(f.name.encode() + f.read_bytes())
    tag = digest.hexdigest()[:16] + ("-san" if sanitize else "") + ("-tsan" if tsan else "")
    lib = out_dir / (f"race_check-{tag}" if exe else f"libdinocxr_emu-{tag}.so")
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX", "g++")
    flags = ["-std=c++20", "-fPIC", "-pthread", "-g", "-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
             "-DDINOCXR_CUDA_EMULATION", "-D__CUDA_ARCH__=900", "-D__CUDA_ARCH_FEAT_SM90_ALL",
             f"-I{HERE / 'include'}", f"-I{KERNELS}", "-include", str(HERE / "simt.h")]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    if tsan:
        flags += ["-fsanitize=thread"]
    work = Path(tempfile.mkdtemp(prefix="dinocxr_emu_"))
    try:
        def compile_one(src: Path) -> Path:
            cpp = work / (src.stem + ".cpp")
            cpp.write_text(rewrite(src.read_text()))
            obj = work / (src.stem + ".o")
            subprocess.run([cxx, *flags, "-c", str(cpp), "-o", str(obj)], check=True)
            return obj

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objs = list(pool.map(compile_one, sources))
        tmp = out_dir / (lib.name + ".tmp")
        subprocess.run([cxx, *flags, *([] if exe else ["-shared"]), *map(str, objs), "-o", str(tmp)], check=True)
        tmp.replace(lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--tsan", action="store_true")
    parser.add_argument("--race-check", action="store_true")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "dinocxr_emu"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.race_check:
        exe = build(out, False, tsan=True, exe=True)
        print(exe)
        return subprocess.run([str(exe)], env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1")).returncode
    print(build(out, args.sanitize, args.tsan))


if __name__ == "__main__":
    sys.exit(main())
