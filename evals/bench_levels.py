"""Microbenchmark: whole draft levels of the engine's drafter (the embedded draft as ``Engine`` loads it)
for B requests of T rows each, with its pool keeping float32 keys (``SlotKVCache(float32_rows=True)``,
the drafter's default on a CPU) and with a pool in the draft's own dtype (SDPA per segment), alternating
in one process; each request has its own prefix (200 + 40 i tokens). Prints one Markdown table: median
milliseconds of each and the two passes' argmax agreement (random ids: flat distributions, near ties).

    python -m spruce.evals.bench_levels [--repeats 7]

The figures measured on the development machine are in kernels/NOTES.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spruce.kvcache import Segment, SlotKVCache

SHAPES = ((1, 1), (1, 4), (2, 1), (4, 1), (4, 4), (8, 1), (8, 2), (16, 1), (16, 2), (16, 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    from spruce import Engine

    engine = Engine.from_pretrained()
    drafter = engine.drafter
    if drafter is None:
        raise SystemExit("the engine loaded no draft model")
    most = max(b for b, _ in SHAPES)
    pools = {
        "float32 rows": drafter.pool,
        "own dtype": SlotKVCache(drafter.model, most, drafter.pool.capacity),
    }
    vocab = min(int(drafter.model.config.vocab_size), 32768)
    gen = torch.Generator().manual_seed(0)
    slots: dict[str, list[int]] = {}
    for name, pool in pools.items():
        drafter.pool = pool
        slots[name] = [pool.allocate() for _ in range(most)]
        for i, slot in enumerate(slots[name]):
            length = 200 + 40 * i
            prompt = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(i))
            drafter.forward([Segment(slot, prompt, torch.arange(length), logits="none")])
    prefix = {name: [pools[name].lengths[s] for s in slots[name]] for name in pools}

    def level(name: str, ids: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        drafter.pool = pool = pools[name]
        rows = ids[0].numel()
        tail = torch.eye(rows, dtype=torch.bool) if rows > 1 else None
        segments = [Segment(s, t, torch.full((rows,), pool.lengths[s]), tail=tail) for s, t in zip(slots[name], ids)]
        start = time.perf_counter()
        out = drafter.forward(segments)
        seconds = time.perf_counter() - start
        for s, length in zip(slots[name], prefix[name]):
            pool.keep(s, length, [])
        return seconds, out

    print(f"threads {torch.get_num_threads()}, draft {engine.config.draft_dtype}, pools {[str(p.keys[0].dtype) for p in pools.values()]}\n")
    print("| requests x rows | float32 rows ms | own dtype ms | ratio | argmax agreement |")
    print("|---|---|---|---|---|")
    for batch, rows in SHAPES:
        times: dict[str, list[float]] = {name: [] for name in pools}
        agree = []
        for rep in range(args.repeats):
            ids = [torch.randint(0, vocab, (rows,), generator=gen) for _ in range(batch)]
            outs = {}
            for name in list(pools) if rep % 2 == 0 else list(pools)[::-1]:
                seconds, outs[name] = level(name, ids)
                times[name].append(seconds * 1e3)
            agree += [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(*outs.values())]
        ms = [statistics.median(times[name]) for name in pools]
        print(f"| {batch} x {rows} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[0] / ms[1]:.3f} | {statistics.mean(agree):.3f} |", flush=True)
    drafter.pool = pools["float32 rows"]


if __name__ == "__main__":
    main()
