"""Tree-attention backends on a GPU: correctness on fresh random data, then timings, in one call.

    python -m spruce.kernels.bench --out "$OUT/kernels.json"          # the issue's grid (GPU)
    python -m spruce.kernels.bench --smoke                            # tiny shapes, CPU, checks the script

Per shape (B requests, each with a P-token prefix and a T-node random tree; H query heads, Hkv key/value
heads, D head dim, bf16): every backend's output is compared with the float32 reference on the first
request, then timed with ``triton.testing.do_bench`` (median, CUDA events) on GPU:
- ``triton``: the tree kernel (``kernels.tree_attention``);
- ``sdpa_mask``: torch SDPA over [B, H, T, P+T] with the explicit boolean tree mask (what HF-based
  engines do);
- ``sdpa_nomask``: torch SDPA (flash backend) over the same keys with no mask: the lower bound;
- ``flex``: compiled FlexAttention with the tree block mask.
Achieved bandwidth = K and V bytes read / time, beside the measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from spruce.kernels.reference import pack_bitmask, tree_attention_reference

GRID = {"B": (1, 8, 32), "P": (512, 4096, 16384), "T": (16, 64)}
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# max abs error vs the float32 reference accepted for bf16 outputs
BF16_ATOL = 3e-2


def _random_ancestors(n: int, gen: torch.Generator) -> torch.Tensor:
    visible = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        visible[i] |= visible[int(torch.randint(0, i, (1,), generator=gen))]
    return visible


def make_inputs(b: int, p: int, t: int, h: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ancestors = [_random_ancestors(t, gen) for _ in range(b)]
    mask = torch.cat([pack_bitmask(a) for a in ancestors]).to(device)
    q = torch.randn(b * t, h, d, generator=gen).to(device, dtype)
    k = torch.randn(b * (p + t), hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(b * (p + t), hkv, d, generator=gen).to(device, dtype)
    cu_q = torch.arange(0, b * t + 1, t, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, b * (p + t) + 1, p + t, dtype=torch.int32, device=device)
    # padded [B, *, *, D] views and the explicit mask for the SDPA rows
    visible = torch.ones(b, 1, t, p + t, dtype=torch.bool)
    for i, a in enumerate(ancestors):
        visible[i, 0, :, p:] = a
    return {
        "q": q, "k": k, "v": v, "mask": mask, "cu_q": cu_q, "cu_k": cu_k,
        "q4": q.view(b, t, h, d).transpose(1, 2),
        "k4": k.view(b, p + t, hkv, d).transpose(1, 2),
        "v4": v.view(b, p + t, hkv, d).transpose(1, 2),
        "visible": visible.to(device),
    }


def backends(x: dict) -> dict:
    """name -> zero-argument callable returning [B*T, H, D]."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from spruce.kernels.flex_backend import flex_tree_attention

    b, h, t, d = x["q4"].shape

    def packed(o4: torch.Tensor) -> torch.Tensor:
        return o4.transpose(1, 2).reshape(b * t, h, d)

    fns = {
        "sdpa_mask": lambda: packed(sdpa(x["q4"], x["k4"], x["v4"], attn_mask=x["visible"], enable_gqa=True)),
        "sdpa_nomask": lambda: packed(sdpa(x["q4"], x["k4"], x["v4"], enable_gqa=True)),
        "flex": lambda: flex_tree_attention(x["q"], x["k"], x["v"], x["mask"], x["cu_q"], x["cu_k"])[0],
    }
    try:
        from spruce.kernels.tree_attention import tree_attention

        n_k = x["k"].shape[0] // b
        fns["triton"] = lambda: tree_attention(
            x["q"], x["k"], x["v"], x["mask"], x["cu_q"], x["cu_k"], max_seqlen_q=t, max_seqlen_k=n_k
        )[0]
    except ImportError:
        pass
    return fns


def check(x: dict, fns: dict, t: int, p: int) -> dict[str, float]:
    """Max abs error of each backend on request 0 against the float32 reference (sdpa_nomask excluded:
    it ignores the tree on purpose)."""
    q, k, v = x["q"][:t].float(), x["k"][: p + t].float(), x["v"][: p + t].float()
    cu_q = torch.tensor([0, t], dtype=torch.int32)
    cu_k = torch.tensor([0, p + t], dtype=torch.int32)
    want, _ = tree_attention_reference(q.cpu(), k.cpu(), v.cpu(), x["mask"][:t].cpu(), cu_q, cu_k)
    errors = {}
    for name, fn in fns.items():
        if name != "sdpa_nomask":
            errors[name] = float((fn()[:t].float().cpu() - want).abs().max())
    return errors


def timed(fn, device: str) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str) -> float:
    """Device copy bandwidth (read + write bytes per second) with a 1 GiB buffer."""
    n = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3) / 1e9


def run(shapes: list[tuple[int, int, int]], device: str, h: int, hkv: int, d: int) -> dict:
    dtype = torch.bfloat16
    rows = []
    for b, p, t in shapes:
        x = make_inputs(b, p, t, h, hkv, d, dtype, device)
        fns = backends(x)
        errors = check(x, fns, t, p)
        ms = {name: timed(fn, device) for name, fn in fns.items()}
        kv_bytes = 2 * b * (p + t) * hkv * d * torch.finfo(dtype).bits // 8
        rows.append({
            "B": b, "P": p, "T": t, "ms": ms, "max_abs_error": errors,
            "kv_gbs": {name: kv_bytes / (m * 1e-3) / 1e9 for name, m in ms.items()},
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "copy_gbs": copy_bandwidth_gbs(device)}


def markdown(report: dict) -> str:
    lines = [
        f"copy bandwidth {report['copy_gbs']:.0f} GB/s; times in ms (median); ratios: triton / sdpa_nomask "
        "(goal <= 1.25) and sdpa_mask / triton (goal >= 4 at P=4096, T=64)",
        "",
        "| B | P | T | triton | sdpa_nomask | sdpa_mask | flex | triton/nomask | mask/triton | triton GB/s | max err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ms = r["ms"]
        tri = ms.get("triton", math.nan)
        lines.append(
            f"| {r['B']} | {r['P']} | {r['T']} | {tri:.3f} | {ms['sdpa_nomask']:.3f} | {ms['sdpa_mask']:.3f} | "
            f"{ms['flex']:.3f} | {tri / ms['sdpa_nomask']:.2f} | {ms['sdpa_mask'] / tri:.1f} | "
            f"{r['kv_gbs'].get('triton', math.nan):.0f} | {max(r['max_abs_error'].values()):.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    parser.add_argument("--out", help="write the JSON report here (and a .md beside it)")
    args = parser.parse_args(argv)
    if args.smoke:
        shapes, device, h, hkv, d = [(2, 40, 16)], "cpu", 4, 2, 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --smoke for a CPU check of the script")
        shapes = [(b, p, t) for b in GRID["B"] for p in GRID["P"] for t in GRID["T"]]
        device, h, hkv, d = "cuda", HEADS, KV_HEADS, HEAD_DIM
    report = run(shapes, device, h, hkv, d)
    report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report["date"] = time.strftime("%Y-%m-%d")
    report["torch"] = torch.__version__
    table = markdown(report)
    print(table)
    bad = [r for r in report["rows"] if max(r["max_abs_error"].values()) > BF16_ATOL]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table + "\n")
    if bad:
        print(f"FAILED correctness on {len(bad)} shapes (max abs error > {BF16_ATOL})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
