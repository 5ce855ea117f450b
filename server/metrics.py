"""Prometheus metrics under the names gateways and dashboards already read (vLLM's), on their own
registry (several servers in one process, as in tests, do not collide).

Definitions: time to first token = request arrival to its first emitted token; inter-token latency =
the gap between two consecutive steps of a request (one observation per step; a speculative step emits
one or more tokens); end-to-end = arrival to the last token. Speculation counters follow vLLM's spec
decode metrics: drafts = steps that verified at least one draft token; draft tokens; accepted tokens
(the bonus token not counted); accepted tokens per position = accepted draft tokens at tree depth
``position`` (0-based). spruce's own (``spruce:`` prefix): the plan calibration counters of
``spruce.stats``. All come from the host-side step records: no device synchronization is added.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spruce.stats import SpecStats

# latency buckets in seconds (CPU steps take ~0.1-1 s, GPU steps a few ms)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive steps of a request.", labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", labels, buckets=_LATENCY_BUCKETS, registry=reg)
        self.running = Gauge("vllm:num_requests_running", "Requests being generated.", labels, registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued.", labels, registry=reg)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache in use, fraction of capacity (0-1).", labels, registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=reg)
        self.success = Counter("vllm:request_success", "Finished requests by reason.", [*labels, "finished_reason"], registry=reg)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Steps that verified draft tokens.", labels, registry=reg)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", labels, registry=reg)
        self.accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted (bonus not counted).", labels, registry=reg)
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by tree depth (0-based).",
            [*labels, "position"], registry=reg,
        )
        # spruce's own: plan calibration of adaptive speculation (``spruce.stats``), summed over
        # finished requests; expected / emitted near 1 means the cost model's acceptance estimates hold
        self.planned_steps = Counter("spruce:planned_steps", "Steps the cost model planned a draft tree for.", labels, registry=reg)
        self.planned_expected = Counter(
            "spruce:planned_expected_tokens", "Tokens the planned trees were expected to emit (bonus included).", labels, registry=reg
        )
        self.planned_emitted = Counter("spruce:planned_emitted_tokens", "Tokens the planned trees emitted.", labels, registry=reg)
        for gauge in (self.running, self.waiting, self.kv_usage):
            gauge.labels(model_name).set(0)

    def request_finished(self, stats: SpecStats, prompt_tokens: int, finish_reason: str) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(stats.output_tokens)
        self.success.labels(m, finish_reason).inc()
        self.drafts.labels(m).inc(sum(n for size, n in stats.steps_by_tree_size.items() if size > 0))
        self.draft_tokens.labels(m).inc(stats.drafted)
        self.accepted_tokens.labels(m).inc(stats.accepted)
        for pos, count in enumerate(stats.accepted_by_depth):
            self.accepted_per_pos.labels(m, str(pos)).inc(count)
        self.planned_steps.labels(m).inc(stats.planned_steps)
        self.planned_expected.labels(m).inc(stats.planned_expected_tokens)
        self.planned_emitted.labels(m).inc(stats.planned_emitted_tokens)
