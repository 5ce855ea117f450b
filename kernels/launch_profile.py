"""Where the tree kernel's host time goes: cProfile over many queued calls, beside an empty Triton launch
and a torch allocation (GPU only; the CPU interpreter's host path is a different program).

    python -m spruce.kernels.launch_profile --out "$OUT/launch_profile.txt"
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time

import torch
import triton
import triton.language as tl
from spruce.kernels.bench import HEAD_DIM, HEADS, KV_HEADS, make_inputs, slotted


@triton.jit
def _empty_kernel(X, n):
    pid = tl.program_id(0)
    if pid < 0:
        tl.store(X + pid, n)


def _host_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    lines = []
    x = torch.empty(16, device="cuda")
    lines.append(f"empty Triton launch (2 args): {_host_us(lambda: _empty_kernel[(1,)](x, 3), args.calls):.1f} us")
    lines.append(f"torch.empty 64 KiB: {_host_us(lambda: torch.empty(16384, device='cuda'), args.calls):.1f} us")
    for b, p, t, label in ((8, 512, 16, "one launch (no split)"), (1, 4096, 16, "split keys + merge")):
        inputs = make_inputs(b, p, t, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
        call = functools.partial(slotted, inputs, t, p + t)
        lines.append(f"B={b} P={p} T={t} {label}: {_host_us(call, args.calls):.1f} us per call")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        lines.append(buf.getvalue())
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
