#!/usr/bin/env bash
# The one prepared call for a lent GPU (device tool): install spruce without touching the image's
# packages, then the tree-kernel grid, the engine-level profile, and the launch-configuration sweep,
# each under its own time limit so that one part running long or failing still returns the others.
#   device run:  bash kernels/gpu_check.sh        (writes under $OUT; ~6 minutes on an H200; SWEEP=1 adds
#                the launch-configuration sweep, ~1 minute; SPLITS=1 the small-batch key-split sweep,
#                ~1.5 minutes; PROFILE=0 skips the engine-level profile, GRID=0 the backend grid,
#                TESTS=0 the kernel tests; ENGINE=1 the engine's checks: float32 greedy outputs with graphs
#                and trees against plain SDPA decoding (~5.5 min alone on an H200, 2026-11-27), then plain /
#                tree / default timed with graphs (~4 min with ENGINE_ARGS="--no-lossless --engine-rounds 2
#                --step-profile"); both in one call need ENGINE_TIMEOUT=600 and the call's whole budget)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
# no index is reachable there: no build isolation (the image has setuptools), no dependencies
python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1 || echo "pip install failed" >>"$log"
if ! (cd /tmp && python3 -c "import spruce.kernels.bench, spruce.evals.gpu_profile") >>"$log" 2>&1; then
  # fallback: the spruce namespace as links to the repository's folders
  echo "using a PYTHONPATH shim" | tee -a "$log"
  mkdir -p /tmp/shim/spruce && ln -sf "$PWD"/spruce/* /tmp/shim/spruce/
  for d in draft verify server kernels evals; do ln -sfn "$PWD/$d" "/tmp/shim/spruce/$d"; done
  export PYTHONPATH=/tmp/shim
fi
if [ "${TESTS:-1}" = 1 ]; then
  # the kernel tests compiled on the card (CI interprets them on a CPU); ~40 s
  echo "== kernel tests" | tee -a "$log"
  timeout 120 python3 -m pytest -q tests/test_tree_attention.py -k "not bench_smoke" >"$OUT/pytest_kernels.txt" 2>&1
  tail -3 "$OUT/pytest_kernels.txt" | tee -a "$log"
fi
if [ "${GRID:-1}" = 1 ]; then
  echo "== kernels grid" | tee -a "$log"
  timeout 210 python3 -m spruce.kernels.bench --out "$OUT/kernels.json" 2>&1 | tee -a "$log" | grep -v '^{'
fi
if [ "${PROFILE:-1}" = 1 ]; then
  # pass costs eager and as CUDA graphs (spruce.graphs), graph replays against the eager pass, the engine
  # with and without graphs
  echo "== engine-level profile" | tee -a "$log"
  timeout 240 python3 -m spruce.evals.gpu_profile --out "$OUT/gpu_profile.json" \
    --acceptance-from evals/results/load_float32.json >>"$log" 2>&1 || echo "gpu_profile exit $?" | tee -a "$log"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); [print(k, json.dumps(r.get(k))[:1500]) for k in ('graph_vs_eager_logits','engine_graphs','prediction')]" "$OUT/gpu_profile.json" 2>&1 | tee -a "$log"
fi
if [ "${ENGINE:-0}" = 1 ]; then
  echo "== engine checks" | tee -a "$log"
  timeout "${ENGINE_TIMEOUT:-360}" python3 -m spruce.evals.gpu_profile --engine-checks ${ENGINE_ARGS:-} --overhead-batches 1 4 16 \
    --overhead-tokens 48 --out "$OUT/engine_checks.json" >"$OUT/engine_checks.log" 2>&1 || echo "engine checks exit $?" | tee -a "$log"
  python3 - "$OUT/engine_checks.json" <<'PY' 2>&1 | tee -a "$log"
import json, sys
r = json.load(open(sys.argv[1]))
ll = r.get("engine_lossless_float32", {})
if ll:
    print("lossless float32:", ll.get("error") or ("all identical" if ll.get("all_identical") else "DIFFERENCES"))
for run in ll.get("runs", []):
    print(" ", {k: run[k] for k in ("batch", "draft", "cuda_graphs", "speculation", "same_tokens", "tokens", "accepted", "steps")}, run.get("graph_failures", ""))
sp = r.get("engine_speed", {})
if "error" in sp:
    print("engine speed error:", sp["error"])
for row in sp.get("rows", []):
    print("B=%d graphs=%s tree/plain %s default/plain %s ngram/plain %s (accepted/step %.2f) tree step/plain step %.2f default budgets %s draft_graphs %s" % (
        row["batch"], row["cuda_graphs"], [round(x, 2) for x in row["tree_vs_plain"]], [round(x, 2) for x in row["default_vs_plain"]],
        [round(x, 2) for x in row["ngram_vs_plain"]], row["ngram_accepted_per_step"],
        row["tree_step_vs_plain_step"], row["default_planned_budgets"], {k: row["draft_graphs"][k] for k in ("graphs", "passes", "failures")} if row["draft_graphs"] else None))
    if "tree_vs_tree_host_rows" in row:
        steps = row["tree_steps"]
        print("  tree, device top-k vs host rows: %s; draft ms/step %.1f (passes %.1f) vs host rows %.1f (passes %.1f)" % (
            [round(x, 2) for x in row["tree_vs_tree_host_rows"]], row["tree_draft_s"] / steps * 1e3, row["tree_draft_pass_s"] / steps * 1e3,
            row["tree_host_rows_draft_s"] / steps * 1e3, row["tree_host_rows_draft_pass_s"] / steps * 1e3))
for batch, prof in r.get("step_profile", {}).items():
    if isinstance(prof, dict) and "by_host_time" in prof:
        with open(sys.argv[1].replace(".json", "_profile_B%s.txt" % batch), "w") as f:
            f.write("%.1f ms per step\n%s\n%s\n%s\n" % (prof["wall_s"] / prof["steps"] * 1e3, prof["by_host_time"], prof["by_device_time"], prof["python_by_tottime"]))
PY
fi
if [ "${SPLITS:-0}" = 1 ]; then
  echo "== key splits sweep (small batches)" | tee -a "$log"
  timeout 150 python3 -m spruce.kernels.bench --splits-sweep --no-grid --out "$OUT/splits.json" 2>&1 | tee -a "$log" | grep -v '^{'
fi
if [ "${SWEEP:-0}" = 1 ]; then
  echo "== launch sweep" | tee -a "$log"
  timeout 80 python3 -m spruce.kernels.bench --sweep --no-grid --out "$OUT/sweep.json" 2>&1 | tee -a "$log" | grep -v '^{'
fi
echo "== done $(date -u +%H:%M:%SZ)" | tee -a "$log"
