"""Gateway metrics in the Prometheus text exposition format (version 0.0.4).

A few gauges, counters and two histograms do not justify a dependency, so the format is written here.
"""

import threading
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: first tokens wait behind prefill, later ones only for a decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0


class RateWindow:
    """A running total and its rate over the last RATE_WINDOW_S seconds; `add` may come from any thread."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s, self.total = window_s, 0
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        with self._lock:
            self.total += count
            self._events.append((time.monotonic() if now is None else now, count))
            self._trim(self._events[-1][0])

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(count for _, count in self._events) / self.window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


class Histogram:
    """Cumulative-bucket histogram, as Prometheus expects it."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class GatewayMetrics:
    """What the gateway observes itself (latencies, outcomes); engine figures come in at render time."""

    def __init__(self):
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(INTER_TOKEN_BUCKETS)
        self.finished: dict[str, int] = {}  # finish reason ("stop", "length", "abort", "error") -> sequences
        self.responses: dict[int, int] = {}  # HTTP status -> count

    def sequence_finished(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def response_sent(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def render(self, stats, in_flight: int) -> str:
        """`stats`: an EngineStats; `in_flight`: sequences admitted by the gateway."""
        lines = []
        lines += _sample("krasis_queue_depth", "gauge", "Admitted sequences waiting to run.", stats.waiting)
        lines += _sample("krasis_running_sequences", "gauge", "Sequences in the running batch.", stats.running)
        lines += _sample("krasis_in_flight_sequences", "gauge", "Sequences admitted and not finished.", in_flight)
        lines += _sample("krasis_kv_pages_in_use", "gauge", "KV cache pages held by sequences.", stats.kv_pages_in_use)
        lines += _sample("krasis_kv_pages_total", "gauge", "KV cache pages in the pool.", stats.kv_pages_total)
        lines += _sample("krasis_prefill_tokens_total", "counter", "Prompt tokens prefilled.", stats.prefill_tokens)
        lines += _sample("krasis_decode_tokens_total", "counter", "Tokens decoded.", stats.decode_tokens)
        lines += _sample("krasis_prefill_tokens_per_second", "gauge",
                         f"Prefill throughput over the last {RATE_WINDOW_S:g} s.", stats.prefill_tokens_per_s)
        lines += _sample("krasis_decode_tokens_per_second", "gauge",
                         f"Decode throughput over the last {RATE_WINDOW_S:g} s.", stats.decode_tokens_per_s)
        lines += self.time_to_first_token.lines(
            "krasis_time_to_first_token_seconds", "From request arrival to a sequence's first token.")
        lines += self.inter_token_latency.lines(
            "krasis_inter_token_latency_seconds", "Between consecutive tokens of a sequence.")
        lines += _labelled("krasis_sequences_finished_total", "counter", "Sequences ended, by reason.",
                           "reason", self.finished)
        lines += _labelled("krasis_http_responses_total", "counter", "API responses, by HTTP status.",
                           "status", self.responses)
        return "\n".join(lines) + "\n"


def _sample(name: str, kind: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def _labelled(name: str, kind: str, help_text: str, label: str, values: dict) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return lines + [f'{name}{{{label}="{key}"}} {count}' for key, count in sorted(values.items())]
