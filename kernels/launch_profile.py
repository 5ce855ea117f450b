"""Where the tree kernel's host time goes: cProfile over many queued calls, beside an empty Triton launch
and a torch allocation (GPU only; the CPU interpreter's host path is a different program).

    python -m spruce.kernels.launch_profile --out "$OUT/launch_profile.txt"
    python -m spruce.kernels.launch_profile --compare old/tree_attention.py    # + another version's host time

``--compare`` loads another copy of ``kernels/tree_attention.py`` from a file and times both versions'
host time per call, alternating, on the same inputs (a launcher change measured side by side).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib.util
import io
import pstats

import torch
import triton
import triton.language as tl
from spruce.kernels import tree_attention
from spruce.kernels.bench import HEAD_DIM, HEADS, KV_HEADS, host_us, make_inputs, slotted


@triton.jit
def _empty_kernel(X, n):
    pid = tl.program_id(0)
    if pid < 0:
        tl.store(X + pid, n)


def _host_us(fn, calls: int) -> float:
    """``bench.host_us`` after one warm-up call (the first call of a launch compiles it)."""
    fn()
    return host_us(fn, calls)


def _load(path: str):
    spec = importlib.util.spec_from_file_location("compared_tree_attention", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(other, inputs: dict, t: int, n_k: int, calls: int, rounds: int = 5) -> tuple[float, float, float]:
    """(this version's, the other's host us per call: the minimum over alternating rounds; max abs
    difference of their outputs)."""

    def caller(module):
        return functools.partial(
            module.tree_attention_slots, inputs["q"], inputs["k_pool"], inputs["v_pool"], inputs["mask"],
            inputs["cu_q"], inputs["slots"], inputs["lens"], max_seqlen_q=t, max_seqlen_k=n_k,
        )

    mine, theirs = caller(tree_attention), caller(other)
    diff = float((mine()[0].float() - theirs()[0].float()).abs().max())
    best_mine, best_theirs = float("inf"), float("inf")
    for _ in range(rounds):
        best_mine = min(best_mine, _host_us(mine, calls))
        best_theirs = min(best_theirs, _host_us(theirs, calls))
    return best_mine, best_theirs, diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out")
    parser.add_argument("--compare", help="another copy of kernels/tree_attention.py to time side by side")
    args = parser.parse_args(argv)
    lines = []
    other = _load(args.compare) if args.compare else None
    x = torch.empty(16, device="cuda")
    lines.append(f"empty Triton launch (2 args): {_host_us(lambda: _empty_kernel[(1,)](x, 3), args.calls):.1f} us")
    lines.append(f"torch.empty 64 KiB: {_host_us(lambda: torch.empty(16384, device='cuda'), args.calls):.1f} us")
    for b, p, t, label in ((8, 512, 16, "one launch (no split)"), (1, 4096, 16, "split keys + merge")):
        inputs = make_inputs(b, p, t, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
        call = functools.partial(slotted, inputs, t, p + t)
        lines.append(f"B={b} P={p} T={t} {label}: {_host_us(call, args.calls):.1f} us per call")
        if other is not None:
            mine, theirs, diff = _compare(other, inputs, t, p + t, args.calls)
            lines.append(f"  side by side (min of 5 alternating rounds): this version {mine:.1f} us, {args.compare} "
                         f"{theirs:.1f} us; outputs differ by {diff:.1e} (max abs)")
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
