"""Every Prometheus metric of the mesh, in one place. SGLang's names are kept (prefix
``sglang:``) so existing Grafana dashboards work. Services create a :class:`WorkerMetrics` or
:class:`RouterMetrics` once and expose ``generate_latest(registry)`` on ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics:
    """Engine-side metrics (per worker)."""

    def __init__(self, registry: CollectorRegistry | None = None, labels: dict[str, str] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.labels = labels or {}
        names = list(self.labels)

        def g(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry)

        def c(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry)

        def h(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry)

        self.num_running_reqs = g("sglang:num_running_reqs", "Requests in the running batch")
        self.num_queue_reqs = g("sglang:num_queue_reqs", "Requests waiting for admission")
        self.num_used_tokens = g("sglang:num_used_tokens", "KV tokens held by requests")
        self.token_usage = g("sglang:token_usage", "Fraction of the KV pool held by requests")
        self.cache_hit_rate = g("sglang:cache_hit_rate", "Prefix cache hit rate (tokens)")
        self.gen_throughput = g("sglang:gen_throughput", "Generation throughput (tokens/s)")
        self.prompt_tokens_total = c("sglang:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens_total = c("sglang:generation_tokens", "Tokens generated")
        self.cached_tokens_total = c("sglang:cached_tokens", "Prompt tokens served from the prefix cache")
        self.num_requests_total = c("sglang:num_requests", "Requests finished")
        self.num_aborted_requests_total = c("sglang:num_aborted_requests", "Requests aborted")
        self.time_to_first_token_seconds = h("sglang:time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.inter_token_latency_seconds = h("sglang:inter_token_latency_seconds", "Inter-token latency", ITL_BUCKETS)
        self.e2e_request_latency_seconds = h("sglang:e2e_request_latency_seconds", "End-to-end latency", LATENCY_BUCKETS)
        # Prefill/decode disaggregation (zero on unified workers). Speed and latency are averages
        # over the transfers that finished since the previous reading (unchanged when none did).
        self.num_prefill_inflight_queue_reqs = g(
            "sglang:num_prefill_inflight_queue_reqs", "Prefilled requests whose KV is being sent to decode"
        )
        self.num_decode_prealloc_queue_reqs = g(
            "sglang:num_decode_prealloc_queue_reqs", "Decode requests waiting for KV pages to be reserved"
        )
        self.num_decode_transfer_queue_reqs = g(
            "sglang:num_decode_transfer_queue_reqs", "Decode requests waiting for their KV from prefill"
        )
        self.kv_transfer_speed_gb_s = g("sglang:kv_transfer_speed_gb_s", "KV transfer speed per request (GB/s)")
        self.kv_transfer_latency_ms = g("sglang:kv_transfer_latency_ms", "KV transfer latency per request (ms)")
        self.kv_transfer_bytes_total = c("sglang:kv_transfer_bytes", "KV bytes transferred (all layers, K and V)")
        self.kv_transfer_reqs_total = c("sglang:kv_transfer_reqs", "Requests whose KV transfer completed")
        self.num_transfer_failed_reqs_total = c(
            "sglang:num_transfer_failed_reqs", "Requests whose KV transfer failed or timed out"
        )

    def child(self, metric: Gauge | Counter | Histogram) -> Gauge | Counter | Histogram:
        return metric.labels(**self.labels) if self.labels else metric


class RouterMetrics:
    """Front-door metrics: requests per worker and policy decision, upstream errors, latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "sglang_router:requests", "Requests routed", ["worker", "policy", "decision"], registry=r
        )
        self.http_requests_total = Counter(
            "sglang_router:http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.upstream_errors_total = Counter(
            "sglang_router:upstream_errors", "Failed calls to workers", ["worker", "code"], registry=r
        )
        self.num_workers = Gauge("sglang_router:num_workers", "Workers known from the registry", ["role"], registry=r)
        self.pd_failures_total = Counter(
            "sglang_router:pd_failures", "PD attempts that failed, by stage (prefill, decode, timeout)", ["stage"],
            registry=r,
        )
        self.prompt_tokens_total = Counter("sglang:prompt_tokens", "Prompt tokens routed", registry=r)
        self.generation_tokens_total = Counter("sglang:generation_tokens", "Tokens streamed back", registry=r)
        self.time_to_first_token_seconds = Histogram(
            "sglang:time_to_first_token_seconds", "Time to first token at the router", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency_seconds = Histogram(
            "sglang:inter_token_latency_seconds", "Inter-token latency at the router", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e_request_latency_seconds = Histogram(
            "sglang:e2e_request_latency_seconds", "End-to-end latency at the router", buckets=LATENCY_BUCKETS, registry=r
        )
