"""Per-token overhead of the serving pipeline against the in-process engine, over real HTTP streams.

Starts `krasis-ctl serve` twice (worker pipeline, then `--in-process`) on the same model, runs c concurrent
streaming completions (greedy, `ignore_eos`) and reports median inter-token latency, median TTFT and
aggregate decode tokens/s per mode and concurrency, then the pipeline's cost relative to in-process.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

STARTUP_TIMEOUT_S = 180.0
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MODES = {"pipeline": [], "in-process": ["--in-process"]}


@dataclass
class StreamTiming:
    """One stream: when it was sent, when each content chunk arrived, and how many tokens it generated."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def decode_s_per_chunk(self) -> float:
        """Mean gap: unlike the median, it is not fooled when tokens arrive in bursts of near-zero gaps."""
        return (self.chunk_times[-1] - self.chunk_times[0]) / max(1, len(self.chunk_times) - 1)

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


class Server:
    """One `krasis-ctl serve` subprocess on a free loopback port; output goes to a log file."""

    def __init__(self, args: list[str], work_dir: Path):
        self.port = free_port()
        self.log_path = work_dir / "server.log"
        env = {**os.environ, "KRASIS_HOME": str(work_dir / "home"), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        command = krasis_ctl() + ["serve", "--port", str(self.port), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def krasis_ctl() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "krasis-ctl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "krasis.ctl"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def stream_once(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                      logprobs: bool) -> StreamTiming:  # fmt: skip
    """One streaming completion; a chunk counts when it carries a token (the usage chunk counts the tokens).

    With `logprobs: 0` every token is its own chunk; without it, a token that ends mid UTF-8 character has no
    text, so the gateway merges it into the next chunk and a gap may span two tokens.
    """
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if logprobs:
        body["logprobs"] = 0
    timing = StreamTiming(sent=time.perf_counter())
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw_line in response.content:
            line = raw_line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now, event = time.perf_counter(), json.loads(line[len(b"data: "):])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                timing.tokens = event["usage"]["completion_tokens"]
            if any(choice.get("text") or choice.get("logprobs") for choice in event.get("choices", [])):
                timing.chunk_times.append(now)
    return timing


async def run_concurrency(url: str, model: str, streams: int, max_tokens: int, logprobs: bool) -> dict:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        jobs = [stream_once(session, url, model, max_tokens, logprobs) for _ in range(streams)]
        timings = await asyncio.gather(*jobs)
        wall_s = time.perf_counter() - start
    gaps = [gap for t in timings for gap in t.gaps]
    tokens = sum(t.tokens for t in timings)
    chunks = sum(len(t.chunk_times) for t in timings)
    return {
        "streams": streams,
        "itl_ms_median": 1e3 * statistics.median(gaps),
        "itl_ms_p90": 1e3 * statistics.quantiles(gaps, n=10)[-1],
        "itl_ms_mean": 1e3 * statistics.mean(t.decode_s_per_chunk for t in timings),
        "ttft_ms_median": 1e3 * statistics.median(t.ttft for t in timings),
        "tokens": tokens,
        "chunks_per_token": chunks / tokens,
        "wall_s": wall_s,
        "aggregate_tok_s": tokens / wall_s,
    }


async def model_id(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as response:
        return (await response.json())["data"][0]["id"]


async def bench_server(url: str, args: argparse.Namespace) -> list[dict]:
    model, logprobs = await model_id(url), not args.no_logprobs
    for _ in range(args.warmup):  # first requests pay for lazy init, allocator growth, JIT caches
        await run_concurrency(url, model, max(args.streams), args.max_tokens, logprobs)
    rows = []
    for c in args.streams:
        rounds = [await run_concurrency(url, model, c, args.max_tokens, logprobs) for _ in range(args.rounds)]
        rows.append(max(rounds, key=lambda r: r["aggregate_tok_s"]))  # the round neighbours disturbed least
    return rows


def bench_mode(mode: str, args: argparse.Namespace, work_dir: Path) -> list[dict]:
    server_args = ["--max-concurrency", str(max(16, max(args.streams))), *MODES[mode]]
    if args.model:
        server_args += ["--model", args.model]
    if mode == "pipeline":
        server_args += ["--cpu-workers", str(args.cpu_workers), "--gpu", args.gpu]
    log(f"[{mode}] starting krasis-ctl serve {' '.join(server_args)}")
    (work_dir / mode).mkdir()
    server = Server(server_args, work_dir / mode)
    try:
        server.wait_until_healthy()
        log(f"[{mode}] healthy on {server.base_url}; warming up and measuring...")
        rows = asyncio.run(bench_server(server.base_url, args))
    finally:
        server.stop()
    return [{"mode": mode, **row} for row in rows]


def overhead(rows: list[dict]) -> list[dict]:
    """Pipeline cost per concurrency: ITL ratio (>1 is slower) and throughput ratio (<1 is slower)."""
    by_key = {(r["mode"], r["streams"]): r for r in rows}
    result = []
    for (mode, c), pipe in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        ref = by_key.get(("in-process", c))
        if mode != "pipeline" or ref is None:
            continue
        result.append({
            "streams": c,
            "itl_ratio": pipe["itl_ms_median"] / ref["itl_ms_median"],
            "itl_mean_ratio": pipe["itl_ms_mean"] / ref["itl_ms_mean"],
            "tok_s_ratio": pipe["aggregate_tok_s"] / ref["aggregate_tok_s"],
        })  # fmt: skip
    return result


def machine() -> dict:
    return {"cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()}


def print_report(result: dict) -> None:
    before, after = result["machine_before"], result["machine_after"]
    print(f"machine: {before['cores']} cores ({before['affinity']} usable), shared with other work; "
          f"load average before {fmt_load(before['loadavg'])}, after {fmt_load(after['loadavg'])}")
    print(f"model: {result['model']}; max_tokens {result['max_tokens']}, greedy, ignore_eos, "
          f"{'logprobs 0 (one chunk per token)' if result['logprobs'] else 'no logprobs'}, "
          f"best of {result['rounds']} rounds; "
          f"pipeline --cpu-workers {result['cpu_workers']}")
    print(f"\n{'mode':<11}{'streams':>8}{'ITL ms p50':>12}{'p90':>8}{'mean':>8}{'TTFT ms p50':>13}"
          f"{'agg tok/s':>11}{'chunks/tok':>12}")
    for r in result["rows"]:
        print(f"{r['mode']:<11}{r['streams']:>8}{r['itl_ms_median']:>12.2f}{r['itl_ms_p90']:>8.2f}"
              f"{r['itl_ms_mean']:>8.2f}{r['ttft_ms_median']:>13.1f}{r['aggregate_tok_s']:>11.1f}"
              f"{r['chunks_per_token']:>12.2f}")
    if result["overhead"]:
        print(f"\npipeline / in-process\n{'streams':>8}{'ITL p50':>16}{'ITL mean':>16}{'agg tok/s':>16}")
    for o in result["overhead"]:
        ratios = (o["itl_ratio"], o["itl_mean_ratio"], o["tok_s_ratio"])
        print(f"{o['streams']:>8}" + "".join(f"{r:>8.2f} ({r - 1:+4.0%})" for r in ratios))


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress never pollutes --json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the embedded tiny model)")
    parser.add_argument("--cpu-workers", default="1")
    parser.add_argument("--gpu", default="none", help="pipeline prefill device (none: the CPU, as in-process)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds at the largest concurrency")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; the fastest is reported")
    parser.add_argument("--no-logprobs", action="store_true",
                        help="plain text chunks (some carry two tokens) instead of logprobs: 0, one chunk per token")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    result = {"model": args.model or "embedded default", "max_tokens": args.max_tokens,
              "logprobs": not args.no_logprobs, "rounds": args.rounds, "cpu_workers": args.cpu_workers,
              "machine_before": machine(), "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="krasis-bench-") as tmp:
        for mode in args.modes:
            result["rows"] += bench_mode(mode, args, Path(tmp))
    result["machine_after"] = machine()
    result["overhead"] = overhead(result["rows"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
