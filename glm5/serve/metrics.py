"""Prometheus metrics in the text exposition format (0.0.4), hand-written: counters, gauges, histograms.

Names follow vLLM's (``vllm:num_requests_running`` -> ``glm5_num_requests_running`` ...) so existing
dashboards map one to one. Engine gauges (queue depth, KV-cache use, speculative counters) are read from
the backend at scrape time; request-level series are recorded by the serving code.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        items = sorted(self.values.items()) or ([((), 0.0)] if not self.labelnames else [])
        for labels, v in items:
            lines.append(f"{self.name}{_labels(self.labelnames, labels)} {_num(v)}")
        return lines


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.fn = fn
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = float(v)

    def render(self) -> list[str]:
        v = self.fn() if self.fn is not None else self.value
        return self.header() + [f"{self.name} {_num(float(v))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float, n: int = 1) -> None:
        with self._lock:
            i = next((j for j, b in enumerate(self.buckets) if v <= b), len(self.buckets))
            self.counts[i] += n
            self.sum += v * n
            self.count += n

    def render(self) -> list[str]:
        lines = self.header()
        acc = 0
        for b, c in zip(self.buckets + (math.inf,), self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{_num(b) if not math.isinf(b) else "+Inf"}"}} {acc}')
        lines.append(f"{self.name}_sum {_num(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """All series of one server; ``render(backend_stats)`` gives the /metrics body."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        p = "glm5_"
        self.http_requests = Counter(p + "http_requests_total", "HTTP requests by route and status",
                                     ("method", "path", "status"))
        self.requests = Counter(p + "requests_total", "Generation requests by endpoint and outcome",
                                ("endpoint", "outcome"))
        self.request_success = Counter(p + "request_success_total", "Finished completions by finish reason",
                                       ("finished_reason",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed")
        self.cached_prompt_tokens = Counter(p + "prompt_tokens_cached_total", "Prompt tokens served from the prefix cache")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Generated tokens")
        self.reasoning_tokens = Counter(p + "reasoning_tokens_total", "Generated tokens inside reasoning")
        self.cost = Counter(p + "cost_usd_total", "Cost of served tokens in USD at the configured prices", ("kind",))
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first generated token", TTFT_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between generated tokens", ITL_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last token", E2E_BUCKETS)
        self.prompt_len = Histogram(p + "request_prompt_tokens", "Prompt length per request", TOKEN_BUCKETS)
        self.gen_len = Histogram(p + "request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS)
        # the admin routes (glm5/serve/admin.py, off by default): the RL trainer's sleep / wake / reload cycle
        self.sleeps = Counter(p + "sleep_total", "Engine sleeps (POST /sleep) by level", ("level",))
        self.wake_ups = Counter(p + "wake_up_total", "Engine wake-ups (POST /wake_up) by tags", ("tags",))
        self.weight_updates = Counter(p + "weight_updates_total", "Weight updates (POST /update_weights_from_disk) "
                                      "by outcome", ("outcome",))
        self.is_sleeping = Gauge(p + "is_sleeping", "1 while the engine is asleep (KV cache or weights released)")
        self.weight_version = Gauge(p + "weight_version", "Weight updates applied since the server started")
        self.in_flight = 0  # generation requests inside the server (admitted, not finished)
        self._series: list[_Metric] = [
            self.http_requests, self.requests, self.request_success, self.prompt_tokens, self.cached_prompt_tokens,
            self.generation_tokens, self.reasoning_tokens, self.cost, self.ttft, self.itl, self.e2e,
            self.prompt_len, self.gen_len, self.sleeps, self.wake_ups, self.weight_updates, self.is_sleeping,
            self.weight_version,
        ]

    def render(self, stats: dict[str, float] | None = None) -> str:
        stats = stats or {}
        lines: list[str] = []
        for m in self._series:
            lines.extend(m.render())
        gauges = [
            ("num_requests_running", "Requests running in the engine batch", "gauge"),
            ("num_requests_waiting", "Requests waiting in the engine queue", "gauge"),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", "gauge"),
            ("kv_cache_free_blocks", "Free KV-cache blocks", "gauge"),
            ("kv_cache_total_blocks", "Usable KV-cache blocks", "gauge"),
            ("num_preemptions_total", "Sequences preempted for lack of cache", "counter"),
            ("prefix_cache_hit_tokens_total", "Prompt tokens reused from the prefix cache", "counter"),
            ("engine_steps_total", "Engine steps run", "counter"),
            ("spec_decode_num_draft_tokens_total", "MTP draft tokens proposed", "counter"),
            ("spec_decode_num_accepted_tokens_total", "MTP draft tokens accepted", "counter"),
            ("spec_decode_num_verify_steps_total", "Speculative verification steps", "counter"),
        ]
        for key, help, kind in gauges:
            name = "glm5_" + key
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_num(float(stats.get(key, 0.0)))}"]
        drafts = stats.get("spec_decode_num_draft_tokens_total", 0.0)
        acc = stats.get("spec_decode_num_accepted_tokens_total", 0.0)
        steps = stats.get("spec_decode_num_verify_steps_total", 0.0)
        lines += ["# HELP glm5_spec_decode_acceptance_rate Accepted / proposed MTP draft tokens",
                  "# TYPE glm5_spec_decode_acceptance_rate gauge",
                  f"glm5_spec_decode_acceptance_rate {_num(acc / drafts if drafts else 0.0)}",
                  "# HELP glm5_spec_decode_mean_acceptance_length Tokens emitted per verification step (bonus included)",
                  "# TYPE glm5_spec_decode_mean_acceptance_length gauge",
                  f"glm5_spec_decode_mean_acceptance_length {_num((acc + steps) / steps if steps else 0.0)}",
                  "# HELP glm5_server_requests_in_flight Generation requests admitted by the server and not finished",
                  "# TYPE glm5_server_requests_in_flight gauge",
                  f"glm5_server_requests_in_flight {self.in_flight}",
                  "# HELP glm5_model_info Served model",
                  "# TYPE glm5_model_info gauge",
                  f'glm5_model_info{{model_name="{_escape(self.model_name)}"}} 1']
        return "\n".join(lines) + "\n"
