"""Command line: ``spruce generate``.

Defaults come from the config dataclasses (``SamplingParams``, ``EngineConfig``), never repeated here.
``--json`` prints one object with ``text``, ``token_ids``, ``finish_reason`` and ``stats`` (a contract).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spruce.config import (
    CUDA_GRAPHS,
    DRAFT_DTYPES,
    DRAFTERS,
    DTYPES,
    EngineConfig,
    SamplingParams,
    ServeConfig,
    SpeculationConfig,
    parse_tree_paths,
)
from spruce.errors import SpruceError
from spruce.kernels.backend import BACKENDS

_SAMPLING = SamplingParams()
if TYPE_CHECKING:
    from spruce.engine import Engine

_ENGINE = EngineConfig()


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template)")
    p.add_argument("--max-tokens", type=int, default=_SAMPLING.max_tokens)
    p.add_argument("--temperature", type=float, default=_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=_SAMPLING.top_p)
    p.add_argument("--top-k", type=int, default=_SAMPLING.top_k)
    p.add_argument("--seed", type=int, default=_SAMPLING.seed)
    p.add_argument("--stop", action="append", default=list(_SAMPLING.stop), help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens even past end-of-text")
    p.add_argument("--no-speculation", action="store_true", help="plain target decoding (the baseline)")
    p.add_argument("--tree-depth", type=int, help="draft tree depth (default: sized for device and dtype)")
    p.add_argument("--tree-top-k", type=int, help="children per expanded draft node")
    p.add_argument("--tree-budget", type=int, help="most draft nodes per step")
    p.add_argument(
        "--tree-paths", type=_tree_paths,
        help="a static tree as sibling-rank paths, e.g. 0/1/00/01 (replaces the depth/top-k/budget tree)",
    )
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_tensor_parallel(p)
    _add_model_args(p)


def _add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel", type=int, default=_ENGINE.tensor_parallel,
        help="shard the target over N processes: run under torchrun --nproc-per-node N (rank 0 serves / prints)",
    )


def _tree_paths(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return parse_tree_paths(text)
    except SpruceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _speculation(args: argparse.Namespace, default: SpeculationConfig | None) -> SpeculationConfig | None:
    if args.no_speculation:
        return None
    given = (("depth", args.tree_depth), ("top_k", args.tree_top_k), ("budget", args.tree_budget), ("tree_paths", args.tree_paths))
    overrides = {k: v for k, v in given if v is not None}
    if not overrides:
        return default
    # a tree given on the command line is used as is: the cost model does not replace it
    return dataclasses.replace(default or SpeculationConfig(drafter=args.drafter or "model"), adaptive=False, **overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    engine = _load_engine(args)
    if engine.tp is not None and not engine.tp.is_leader:
        engine.follow()  # rank 0 takes the request and reports; this rank holds its shard
        engine.tp.close()
        return 0
    prompt = args.prompt if args.raw else engine.apply_chat_template(args.prompt)
    try:
        out = engine.generate(prompt, params, speculation=_speculation(args, engine.default_speculation))[0]
    finally:
        engine.finish()
        if engine.tp is not None:
            engine.tp.close()
    if args.json:
        print(json.dumps(out.to_dict()))
    else:
        print(out.text)
        s = out.stats
        print(
            f"\n[{s.output_tokens} tokens in {s.wall_time_s:.2f} s, {s.tokens_per_s:.2f} tok/s, "
            f"mean accepted length {s.mean_accepted_length:.2f} (bonus counted), finish: {out.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=_ENGINE.target, help="HF model dir or .gguf file (default: embedded)")
    p.add_argument("--draft", default=_ENGINE.draft, help="HF model dir or .gguf file (default: embedded)")
    p.add_argument("--drafter", default=_ENGINE.drafter, choices=DRAFTERS,
                   help="ngram loads no draft model (default: both with a draft model on a CPU, else model)")
    p.add_argument("--device", default=_ENGINE.device)
    p.add_argument("--dtype", default=_ENGINE.dtype, choices=DTYPES)
    p.add_argument(
        "--draft-dtype", default=_ENGINE.draft_dtype, choices=DRAFT_DTYPES,
        help="default: auto (w8a8 or bfloat16 on CPUs with native bfloat16, by a measurement at load; else w8a8 or --dtype); int8 (weights) and w8a8 (weights and, where harmless, activations): CPU only",
    )
    p.add_argument(
        "--draft-vocab", type=int, default=_ENGINE.draft_vocab,
        help="the draft's output layer scores only its first N token ids plus the special tokens "
        "(a cheaper draft level on a CPU, slightly worse proposals; the output is the same); 0: all",
    )
    p.add_argument(
        "--attention-backend", default=_ENGINE.attention_backend, choices=("auto", *BACKENDS),
        help="tree attention: auto picks flash, then triton on a GPU, else sdpa",
    )
    p.add_argument(
        "--cuda-graphs", default=_ENGINE.cuda_graphs, choices=CUDA_GRAPHS,
        help="replay the target's verify and decode passes as CUDA graphs (auto: on a GPU with triton)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=_ENGINE.max_batch_size, help="requests running at once (KV slots)")
    p.add_argument(
        "--max-seq-len", type=int, default=_ENGINE.max_seq_len,
        help="context per request (prompt + output) and KV slot size; 0: the model's, at most 4096",
    )


def _load_engine(args: argparse.Namespace) -> Engine:
    from spruce.engine import Engine

    return Engine.from_pretrained(
        target=args.target, draft=args.draft, device=args.device, dtype=args.dtype,
        draft_dtype=args.draft_dtype, drafter=args.drafter, trust_remote_code=args.trust_remote_code,
        attention_backend=args.attention_backend, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
        tensor_parallel=getattr(args, "tensor_parallel", 1), cuda_graphs=args.cuda_graphs,
        draft_vocab=args.draft_vocab,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    d = ServeConfig()
    p = sub.add_parser("serve", help="serve the models over gRPC (spruce.v1 and KServe v2) with metrics")
    _add_model_args(p)
    _add_tensor_parallel(p)
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="gRPC port")
    p.add_argument("--http-port", type=int, default=d.http_port, help="Prometheus /metrics port (0: off)")
    p.add_argument("--served-model-name", default=d.served_model_name)
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting before RESOURCE_EXHAUSTED")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    p.add_argument("--grace-s", type=float, default=d.grace_s, help="SIGTERM: seconds in-flight requests get")
    p.add_argument("--auth-token-env", help="name of an environment variable holding a required bearer token")
    p.add_argument("--tls-cert", default=d.tls_cert, help="PEM certificate (with --tls-key): serve TLS")
    p.add_argument("--tls-key", default=d.tls_key)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from spruce.engine import Engine
    from spruce.server.app import serve_forever

    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise SpruceError(f"--auth-token-env {args.auth_token_env}: the variable is not set")
    config = ServeConfig(
        host=args.host, port=args.port, http_port=args.http_port, served_model_name=args.served_model_name,
        max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit, grace_s=args.grace_s,
        auth_token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )

    if args.tensor_parallel > 1 and int(os.environ.get("RANK", "0")) != 0:
        import signal

        # rank 0 serves and drains on SIGTERM, then releases this rank (``Engine.finish``); leaving first
        # would break the collectives of the requests it is draining
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine = _load_engine(args)
        engine.follow()  # this rank holds its shard and mirrors rank 0's steps
        assert engine.tp is not None
        engine.tp.close()
        return 0
    return serve_forever(lambda: _load_engine(args), config)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="latency / throughput of speculation vs plain decoding (in process, or a server over gRPC)"
    )
    _add_model_args(p)
    p.add_argument(
        "--url", help="grpc://HOST:PORT (spruce.v1, or KServe v2 with --protocol kserve) or http://HOST:PORT (OpenAI "
        "chat completions) of a running server; default: the engine in this process",
    )
    p.add_argument("--protocol", default="spruce", choices=("spruce", "kserve"), help="with --url: spruce.v1 or KServe v2")
    p.add_argument("--model", default=ServeConfig().served_model_name, help="model name (KServe and OpenAI)")
    p.add_argument("--prompts", help="Spec-Bench-format JSONL (default: the shipped prompt set)")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", default="1", help="closed-loop clients, comma-separated (e.g. 1,2,4)")
    p.add_argument("--request-rate", default="", help="open-loop Poisson arrivals, requests/s, comma-separated")
    p.add_argument(
        "--configs", default="plain,default",
        help="comma-separated: plain, default, and in process bench_spec's forms (chain:N, tree:D:K:B, auto, "
        "ngram:B, hf:assist, hf:lookup); over gRPC plain, default, on:B, ngram, both; KServe: default",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeats per phase (configurations alternate A B / B A)")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="short warm-up requests per configuration")
    p.add_argument("--seed", type=int, default=0, help="prompt order and arrival times")
    p.add_argument("--time-limit", type=float, help="stop starting new phases after this many seconds")
    p.add_argument("--slo-ttft", type=float, default=5.0, help="goodput: TTFT bound, seconds")
    p.add_argument("--slo-itl", type=float, default=1.0, help="goodput: mean inter-token gap bound, seconds")
    p.add_argument("--out", default="bench-report", help="directory for report.json, report.md and PNG plots")


def cmd_bench(args: argparse.Namespace) -> int:
    from spruce.evals.bench_cli import run

    return run(args, None if args.url else lambda: _load_engine(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spruce", description="speculative decoding with token trees")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "serve": cmd_serve, "bench": cmd_bench}[args.command](args)
    except SpruceError as exc:
        print(f"spruce: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
