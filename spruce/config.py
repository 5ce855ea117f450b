"""Frozen configuration dataclasses: each is the single source of its defaults (the CLI reads them).

``SamplingParams`` is per request; ``SpeculationConfig`` describes the draft tree; ``EngineConfig`` is
what ``Engine.from_pretrained`` was asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spruce.errors import InvalidRequestError

DTYPES = ("float32", "bfloat16")
# the draft may also keep its linear layers' weights in int8 (one scale per output row, bfloat16
# activations; CPU only: ``spruce.kernels.cpu_int8``): it only proposes, the target verifies
DRAFT_DTYPES = (*DTYPES, "int8", "w8a8")
# the draft dtypes that keep int8 weights (CPU only); w8a8: int8 activations too where measured harmless
# (``spruce.kernels.cpu_int8.w8a8_linear``)
INT8_DRAFT_DTYPES = ("int8", "w8a8")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int = 128
    temperature: float = 0.0
    # nucleus sampling mass; 1.0 disables it
    top_p: float = 1.0
    # keep the k most likely tokens; 0 disables it
    top_k: int = 0
    # per-request seed: the same seed and request give the same output; None draws a fresh seed
    seed: int | None = None
    # stop strings: generation ends when the text contains one; it is not part of the returned text
    stop: tuple[str, ...] = ()
    # token ids that end generation besides the model's EOS ids (they are kept in token_ids)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


DRAFTERS = ("model", "ngram", "both")
CUDA_GRAPHS = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeculationConfig:
    """Which drafter proposes, and the shape limits of the tree it builds each step.

    Model tree (``spruce.draft.model_drafter``): dynamic, EAGLE-2 style: ``depth`` levels are expanded,
    the ``top_k`` best candidates of each level (by cumulative draft log-probability) getting ``top_k``
    children each, and the ``budget`` best candidates overall are verified (the root excluded).
    ``top_k == 1`` is a chain of ``min(depth, budget)`` tokens. When sampling (temperature > 0) with
    ``sampled_children``, children are instead drawn without replacement from the processed draft
    distribution, level by level until ``budget`` (SpecInfer / Sequoia); without it, the dynamic tree is
    built on the processed distribution's top-k and verified as point-mass proposals. Both are lossless.

    ``adaptive``: ``depth`` and ``budget`` become upper bounds, and each step the engine's cost model
    (``spruce.costmodel``) picks the tree that maximizes expected tokens per second from the measured
    acceptance profile and pass costs, down to no speculation. Seeded sampling requests keep the fixed
    limits, so that a seed reproduces its output whatever the server has measured.

    N-gram (prompt lookup): the longest suffix of ``ngram_max`` .. ``ngram_min`` tokens that occurred
    before proposes what followed it, up to ``ngram_branches`` distinct continuations and ``ngram_budget``
    nodes in all. ``drafter="both"`` merges those branches into the model tree (on top of ``budget``).

    ``draft_window`` > 0: when the draft model is behind by more than that many committed tokens (a long
    prompt it has not read), it reads only the latest ``draft_window`` of them (its earlier context is
    dropped): a cheaper catch-up for a draft that may propose a little worse. The target still verifies
    every token, so the output is unchanged. Adaptive speculation sets it when reading everything
    would cost more than the expected saving allows (``spruce.costmodel.catch_up_tokens``).

    ``draft_on_prefill``: the draft model reads the prompt and proposes a tree before the pass that
    prefills the request, so its first pass can commit several tokens. Off (the default), that pass
    carries n-gram branches at most and the first token comes as soon as plain decoding's would; the
    draft catches up on the next step. On: fewer passes per request, a later first token.

    ``full_draft_vocab``: where the engine narrowed the draft's output layer to its most frequent tokens
    (``EngineConfig.draft_vocab``), score the whole vocabulary instead (every draft pass this request
    shares does; a text of rare tokens, or a side-by-side comparison). The output is the same either way.
    """

    drafter: str = "model"
    depth: int = 2
    top_k: int = 1
    budget: int = 2
    ngram_max: int = 4
    ngram_min: int = 2
    ngram_branches: int = 1
    ngram_budget: int = 4
    # a static tree as Medusa-style sibling-rank paths, e.g. ((0,), (1,), (0, 0)): node (0, 1) is the
    # second child of the root's first child. When set, it replaces depth / top_k / budget for the model
    # tree (the same shape every step: comparable runs, and CUDA-graph friendly later).
    tree_paths: tuple[tuple[int, ...], ...] | None = None
    # sampling: draw children from the draft (True) or take its top-k as deterministic proposals (False)
    sampled_children: bool = True
    # expand a further level only while the best frontier path's draft probability is at least this
    # (0: always expand to ``depth``); adaptive speculation sets it from measured costs each step
    min_expand_prob: float = 0.0
    adaptive: bool = False
    # the draft model reads at most this many of the latest committed tokens when it catches up (0: all)
    draft_window: int = 0
    draft_on_prefill: bool = False
    full_draft_vocab: bool = False

    def __post_init__(self) -> None:
        if self.tree_paths is not None:
            object.__setattr__(self, "tree_paths", _check_paths(self.tree_paths))
        if self.drafter not in DRAFTERS:
            raise InvalidRequestError(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        for name in ("depth", "top_k", "budget", "ngram_min", "ngram_branches", "ngram_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"speculation {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.draft_window, int) or self.draft_window < 0:
            raise InvalidRequestError(f"draft_window must be an integer >= 0, got {self.draft_window!r}")
        if not 0.0 <= self.min_expand_prob <= 1.0:
            raise InvalidRequestError(f"min_expand_prob must be in [0, 1], got {self.min_expand_prob!r}")
        if self.adaptive and self.tree_paths is not None:
            raise InvalidRequestError("adaptive speculation chooses its own tree: drop tree_paths or adaptive")
        if not isinstance(self.ngram_max, int) or self.ngram_max < self.ngram_min:
            raise InvalidRequestError(f"ngram_max must be an integer >= ngram_min, got {self.ngram_max!r}")

    @property
    def uses_model(self) -> bool:
        return self.drafter in ("model", "both")

    @property
    def uses_ngram(self) -> bool:
        return self.drafter in ("ngram", "both")

    @classmethod
    def chain(cls, length: int) -> SpeculationConfig:
        return cls(depth=length, top_k=1, budget=length)


def parse_tree_paths(text: str) -> tuple[tuple[int, ...], ...]:
    """Sibling-rank paths written as digit strings separated by ``/``: ``"0/1/00/01"`` is the root's two
    best children and the first one's two best (ranks above 9 are not writable this way)."""
    try:
        return _check_paths(tuple(tuple(int(c) for c in p.strip()) for p in text.split("/")))
    except ValueError:
        raise InvalidRequestError(f"bad tree paths {text!r}: expected digit strings joined by '/', e.g. 0/1/00") from None


def _check_paths(paths) -> tuple[tuple[int, ...], ...]:
    """Each path's parent path is listed (or is the root) and each node's child ranks are 0..m-1, so a
    node's children are the first m draft choices: its m most likely tokens, or its first m draws."""
    clean = tuple(sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p)))
    if not clean or any(not p or min(p) < 0 for p in clean):
        raise InvalidRequestError("tree_paths must be non-empty paths of sibling ranks >= 0")
    listed = set(clean)
    for p in clean:
        if len(p) > 1 and p[:-1] not in listed:
            raise InvalidRequestError(f"tree path {p} has no parent path {p[:-1]}")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in listed:
            raise InvalidRequestError(f"tree path {p} skips rank {p[-1] - 1}: child ranks must be 0..m-1")
    return clean


def default_speculation(device_type: str, dtype: str, drafter: str = "model") -> SpeculationConfig:
    """The default: adaptive speculation (the cost model picks each step's tree from measured acceptance
    and pass costs) within bounds sized for where the target runs (figures: ``evals/results/``).

    - GPU: passes are weight-bandwidth bound and flat up to tens of tokens: room for wide trees.
    - CPU: a float32 target pass over 16 tokens costs ~2.2x a 1-token pass, bfloat16 less; the draft
      costs ~0.2x a target pass per level. Long chains pay only while the draft is confident, which the
      per-step choice sees (predictable spans: 8-16 tokens; open text: 1-3).

    When sampling, the adaptive trees are the draft's top-k verified as point masses
    (``sampled_children=False``): only such trees can be cut per step by confidence without bias, and
    at temperature 0.7 they measured 1.13x / 1.10x (float32 / bfloat16 target) against 1.07x / 1.00x
    for drawn children with the plan's budget (``evals/results/specbench_*_t0.7.md``).
    """
    if device_type == "cuda":
        return SpeculationConfig(
            drafter=drafter, depth=10, top_k=4, budget=64, ngram_budget=8, sampled_children=False, adaptive=True
        )
    return SpeculationConfig(
        drafter=drafter, depth=16, top_k=2, budget=16, ngram_budget=4, sampled_children=False, adaptive=True
    )


def fixed_speculation(device_type: str, dtype: str, drafter: str = "model") -> SpeculationConfig:
    """A fixed tree per device and dtype: what seeded sampling requests use instead of adaptive trees.

    Measured on the 2-core CPU (evals/results/): float32, one draft token (a pass over 3 tokens costs
    ~1.5x a 1-token pass); bfloat16, depth 3 with 2 per level and 4 nodes (passes cost about the same up
    to ~8 tokens). GPU: weight-bandwidth bound passes, flat up to tens of tokens.
    """
    if device_type == "cuda":
        return SpeculationConfig(drafter=drafter, depth=5, top_k=4, budget=24, ngram_budget=8)
    if dtype == "bfloat16":
        return SpeculationConfig(drafter=drafter, depth=3, top_k=2, budget=4, ngram_budget=2)
    return SpeculationConfig(drafter=drafter, depth=1, top_k=1, budget=1, ngram_budget=1)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine was built with (models as given, before resolution)."""

    target: str | None = None
    draft: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    # the draft may run in another precision than the target: verification keeps the output exact
    draft_dtype: str | None = None
    # which drafter the default speculation uses; "ngram" loads no draft model. None (the default): "both"
    # where a draft model is loaded on a CPU (the cost model adds n-gram tokens only where they pay, and
    # verifies them alone where reading the prompt would not pay the draft; Spec-Bench, 3 prompts per
    # category, 2-core AVX-512 CPU, 2026-11-28: 1.40x / 1.24x / 1.46x against "model"'s 1.39x / 1.16x /
    # 1.41x in float32 greedy / bfloat16 greedy / float32 T=0.7), else "model" (a target alone decodes
    # plainly; on a GPU each n-gram lookup is host time per request per step, not yet measured against a
    # CUDA-graphed step of milliseconds)
    drafter: str | None = None
    trust_remote_code: bool = False
    # tree attention: auto, sdpa, triton, flex or flash (``spruce.kernels.backend``)
    attention_backend: str = "auto"
    # requests running at once (KV slots in the pool; more wait in the queue)
    max_batch_size: int = 16
    # a request's context (prompt + output) and each KV slot's size; 0 = the model's context, at most 4096
    max_seq_len: int = 0
    # the target's weights split over this many processes (``spruce.parallel``; under torchrun)
    tensor_parallel: int = 1
    # the target's verify and decode passes as CUDA graphs (``spruce.graphs``): auto (on a GPU with the
    # Triton backend and one process), on, off
    cuda_graphs: str = "auto"
    # > 0: the draft's output layer scores only its first this many token ids plus the special tokens (a
    # BPE vocabulary's first ids are its most frequent; ``spruce.draft.vocab``); 0: every id
    draft_vocab: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.drafter is not None and self.drafter not in DRAFTERS:
            raise InvalidRequestError(f"drafter must be one of {DRAFTERS} (or None: the default), got {self.drafter!r}")
        if self.draft_dtype is not None and self.draft_dtype not in DRAFT_DTYPES:
            raise InvalidRequestError(f"draft_dtype must be one of {DRAFT_DTYPES}, got {self.draft_dtype!r}")
        if self.draft_dtype in INT8_DRAFT_DTYPES and self.device != "cpu":
            raise InvalidRequestError(
                f"draft_dtype {self.draft_dtype} runs on CPU only (torch's CPU kernels for int8), not on {self.device!r}: "
                "use bfloat16 there"
            )
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise InvalidRequestError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise InvalidRequestError(f"tensor_parallel must be an integer >= 1, got {self.tensor_parallel!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise InvalidRequestError(f"cuda_graphs must be one of {CUDA_GRAPHS}, got {self.cuda_graphs!r}")
        if not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise InvalidRequestError(f"draft_vocab must be an integer >= 0 (0: the whole vocabulary), got {self.draft_vocab!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 0 or self.max_seq_len == 1:
            raise InvalidRequestError(f"max_seq_len must be 0 (the model's) or an integer >= 2, got {self.max_seq_len!r}")


@dataclass(frozen=True)
class ServeConfig:
    """``spruce serve`` options (the CLI is built from these defaults)."""

    host: str = "0.0.0.0"
    port: int = 50051
    # Prometheus /metrics over HTTP; 0 disables it
    http_port: int = 8000
    served_model_name: str = "spruce"
    max_queue: int = 64
    max_tokens_limit: int = 4096
    grace_s: float = 30.0
    # bearer token required in the `authorization` metadata; None = no check
    auth_token: str | None = None
    # PEM files for TLS; None = plaintext
    tls_cert: str | None = None
    tls_key: str | None = None
    threads: int = 16
