"""Building the GPU prefill path from a loaded (CPU-side) model: measure, plan the VRAM budget, copy the
resident part to the device, and pick GPU streaming or CPU prefill per step from measured rates.

    runner = build_prefill_runner(model, "cuda", vram_budget_gib=4, chunk_tokens=4096, step_tokens=32768)
    print(runner.plan.describe())
    hidden = runner.prefill_prompt(prompt_ids)          # [T, H], or through GpuPrefillCore(runner=runner)
"""

import logging

import torch

from krasis.common.kernels.gpu.rowwise import rowwise_runs
from krasis.common.layers.attention import cudnn_attention_runs
from krasis.gpu_worker.device_model import activation_shape, build_device_model, measure_weights
from krasis.gpu_worker.prefill_cost import PrefillRates, measure_pinned_link_rate, measure_tokens_per_s, prefers_cpu
from krasis.gpu_worker.streaming import StreamingPrefill
from krasis.gpu_worker.vram_plan import GiB, VramPlan, plan_vram

log = logging.getLogger("krasis.gpu_worker")

DEFAULT_MARGIN_BYTES = 1 * GiB  # left free under the default budget: CUDA context growth, other processes
DEFAULT_CHUNK_TOKENS = 16384  # the plan halves it until it fits: fewer, larger chunks cost less a layer at 32K
RATE_PROBE_TOKENS = {"gpu": 2048, "cpu": 64}


def default_budget_bytes(device) -> int:
    """Free memory on the device now, minus a margin (the CPU 'device' has no budget to speak of)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - DEFAULT_MARGIN_BYTES)


def plan_for(model, device, vram_budget_gib: float | None, chunk_tokens: int, step_tokens: int,
             group_layers: int = 1, kv_dtype_bytes: int | None = None) -> VramPlan:  # fmt: skip
    budget = default_budget_bytes(device) if vram_budget_gib is None else int(vram_budget_gib * GiB)
    fused = {"cudnn": cudnn_attention_runs(device), "fused_norms": rowwise_runs(device)}
    shape = activation_shape(model, kv_dtype_bytes, **fused)
    return plan_vram(measure_weights(model), shape, budget, chunk_tokens, step_tokens, group_layers)


def build_prefill_runner(model, device="cuda", vram_budget_gib: float | None = None,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, step_tokens: int = 8192, group_layers: int = 1,
                         kv_dtype_bytes: int | None = None, plan: VramPlan | None = None) -> StreamingPrefill:  # fmt: skip
    """A StreamingPrefill over a device copy of `model` (which stays as it is, e.g. for CPU prefill); `step_tokens`
    is the longest prompt it prefills (one step each), `chunk_tokens` the largest chunk the plan may pick;
    `plan` overrides the planning from the budget (tests)."""
    if plan is None:
        plan = plan_for(model, device, vram_budget_gib, chunk_tokens, step_tokens, group_layers, kv_dtype_bytes)
    device_model, experts = build_device_model(model, device, plan.host_embedding, plan.host_lm_head)
    return StreamingPrefill(device_model, experts, plan, device)


class CpuPrefillRoute:
    """Sends a step to the CPU model when the cost model says the CPU finishes it sooner."""

    def __init__(self, cpu_model, rates: PrefillRates, streamed_bytes: int):
        self.cpu_model, self.rates, self.streamed_bytes = cpu_model, rates, streamed_bytes

    def use_cpu(self, tokens: int) -> bool:
        return prefers_cpu(tokens, self.streamed_bytes, self.rates)


def measure_rates(runner: StreamingPrefill, cpu_model) -> PrefillRates:
    """Measured here and now: pinned link rate, GPU prefill rate (streaming included: conservative), CPU rate."""
    vocab = runner.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    sync = lambda: torch.cuda.synchronize(runner.device)  # noqa: E731
    gpu = measure_tokens_per_s(lambda n: runner.prefill_prompt(prompt(n)), RATE_PROBE_TOKENS["gpu"], synchronize=sync)
    cpu = measure_tokens_per_s(lambda n: cpu_prefill(cpu_model, prompt(n)), RATE_PROBE_TOKENS["cpu"], repeats=1)
    link = measure_pinned_link_rate(runner.device)
    return PrefillRates(link_bytes_per_s=link, gpu_tokens_per_s=gpu, cpu_tokens_per_s=cpu)


@torch.inference_mode()
def cpu_prefill(cpu_model, prompt_ids: list[int]) -> torch.Tensor:
    """One prompt through the CPU model on a scratch KV cache -> hidden [T, H]."""
    from krasis.common.kv_cache import KVCache
    from krasis.gpu_worker.streaming import PromptSequence, chunk_batches

    page = 16
    kv = KVCache.allocate(cpu_model.kv_widths, -(-len(prompt_ids) // page), page,
                          cpu_model.model.embed_tokens.weight.dtype, "cpu", cpu_model.state_widths, 1)  # fmt: skip
    seq = PromptSequence(list(prompt_ids), list(range(kv.num_pages)), state_slot=0)
    input_ids, _, batch = chunk_batches([(seq, len(prompt_ids))], kv, "cpu", len(prompt_ids))
    return cpu_model(input_ids, batch)
