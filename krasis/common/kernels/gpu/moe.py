"""Routed experts at prefill sizes. On CUDA with bf16 activations, `fused_moe`'s Triton kernels read q4/q8/bf16
weights as stored. Otherwise (fp32 models, the CPU tests of the device path, no Triton): tokens sorted by expert,
then one grouped GEMM per projection over each block of experts (torch._grouped_mm on sm90+, one GEMM per expert
elsewhere), with q4/q8 weights dequantized a block at a time into a scratch buffer.

Weights are [E, 2I, H] (gate rows then up rows) and [E, H, I], either float tensors or QuantizedWeights."""

import logging

import torch
import torch.nn.functional as F

from krasis.common.kernels.gpu.dequant import DEQUANT_BLOCK_BYTES, dequantize_experts, experts_per_block
from krasis.common.kernels.gpu.fused_moe import fused_available, fused_experts
from krasis.common.layers.mlp import activation
from krasis.common.quant.cpu_kernels import quant_experts
from krasis.common.quant.formats import QuantizedWeight

log = logging.getLogger("krasis.kernels")

_grouped_mm_failed = False


def moe_experts(x, gate_up, down, topk_ids, topk_weights, act: str = "silu",
                scratch_bytes: int = DEQUANT_BLOCK_BYTES) -> torch.Tensor:  # fmt: skip
    """x: [T, H]; topk_*: [T, k] -> [T, H] in x.dtype. On the CPU exactly what StackedExperts computes. The fused
    kernels may dequantize quantized experts first into up to `scratch_bytes` (0: never)."""
    if x.device.type == "cpu":
        if isinstance(gate_up, QuantizedWeight):
            return quant_experts(x, gate_up, down, topk_ids, topk_weights, act)
        return reference_experts(x, gate_up, down, topk_ids, topk_weights, act)
    if fused_available(x, gate_up, act):
        return fused_experts(x, gate_up, down, topk_ids, topk_weights, scratch_bytes=scratch_bytes)
    return grouped_experts(x, gate_up, down, topk_ids, topk_weights, act)


def reference_experts(x, gate_up, down, topk_ids, topk_weights, act: str = "silu") -> torch.Tensor:
    """StackedExperts' loop over hit experts (same op order, so the same bits)."""
    act_fn, out = activation(act), torch.zeros_like(x, dtype=torch.float32)
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(x[token_idx], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, down[expert]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.float())
    return out.to(x.dtype)


def grouped_experts(x, gate_up, down, topk_ids, topk_weights, act: str = "silu") -> torch.Tensor:
    """The device path (also runs on the CPU, for tests): sort, grouped GEMMs per expert block, weighted scatter-add."""
    num_experts, two_inter, _ = gate_up.shape
    inter, act_fn, k = two_inter // 2, activation(act), topk_ids.shape[1]
    flat = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # rows sorted by expert, tokens ascending within one
    token_of, slot_of = order // k, order % k
    ends = torch.bincount(flat, minlength=num_experts).cumsum(0)  # [E] end row of each expert
    ends_host = ends.tolist()  # the one host sync of a layer: block row ranges
    if ends_host and ends_host[-1] != flat.numel():
        raise ValueError(f"grouped_experts: topk_ids hold an expert outside 0..{num_experts - 1}")
    x_sorted = x.index_select(0, token_of)  # [R, H]
    weights = topk_weights.reshape(-1).index_select(0, order)[:, None].float()  # [R, 1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    block = experts_per_block(gate_up.shape) if isinstance(gate_up, QuantizedWeight) else num_experts
    for e0 in range(0, num_experts, block):
        e1 = min(num_experts, e0 + block)
        r0, r1 = (ends_host[e0 - 1] if e0 else 0), ends_host[e1 - 1]
        if r0 == r1:
            continue
        w_gate_up, w_down = _block_weights(gate_up, e0, e1, x.dtype), _block_weights(down, e0, e1, x.dtype)
        offs = (ends[e0:e1] - r0).to(torch.int32)  # [b] end row of each expert inside the block
        rows = [(ends_host[e - 1] if e else 0) - r0 for e in range(e0, e1)] + [r1 - r0]
        h = grouped_mm(x_sorted[r0:r1], w_gate_up, offs, rows)  # [r, 2I]
        y = grouped_mm(act_fn(h[:, :inter]) * h[:, inter:], w_down, offs, rows)  # [r, H]
        # free this block's scratch before the next block dequantizes (one block alive, as the VRAM plan counts);
        # the fp32 weighted rows are one block's too, never [R, H] fp32 for the whole chunk
        del h, w_gate_up, w_down
        scatter_add_by_slot(out, token_of[r0:r1], slot_of[r0:r1], y.float() * weights[r0:r1], k)
    return out.to(x.dtype)


def scatter_add_by_slot(out: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, k: int):
    """out[tokens[i]] += rows[i], one top-k slot at a time. A slot's rows hit distinct tokens, so no two atomic adds
    meet and the order of each token's sum is fixed: bit-identical run to run (one index_add_ over all rows
    lets atomics add a token's experts in any order). out: [T, H] fp32; tokens, slots: [r]; rows: [r, H]."""
    by_slot = torch.argsort(slots, stable=True)
    start = 0
    for count in torch.bincount(slots, minlength=k).tolist():
        if count:
            pick = by_slot[start : start + count]
            out.index_add_(0, tokens.index_select(0, pick), rows.index_select(0, pick))
        start += count


def _block_weights(weight, e0: int, e1: int, dtype) -> torch.Tensor:
    """Experts [e0, e1) as a float [b, N, K] tensor: a view of float weights, a fresh dequantization of quantized ones."""
    if not isinstance(weight, QuantizedWeight):
        return weight[e0:e1]
    out = torch.empty((e1 - e0, *weight.shape[1:]), dtype=dtype, device=weight.qweight.device)
    return dequantize_experts(weight, e0, e1, out)


def grouped_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """a: [r, K] rows sorted by group; w: [b, N, K]; offs: int32 [b] end rows; rows: the b + 1 boundaries on
    the host -> [r, N], each group's rows times its weight transposed."""
    global _grouped_mm_failed
    if not _grouped_mm_failed and _grouped_mm_usable(a, w):
        try:
            return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
        except RuntimeError as exc:  # an unsupported shape or build: the loop below is always right
            _grouped_mm_failed = True
            log.warning("torch._grouped_mm unavailable (%s); using one GEMM per expert", str(exc).splitlines()[0])
    out = a.new_empty(a.shape[0], w.shape[1])
    for i in range(w.shape[0]):
        if rows[i + 1] > rows[i]:
            out[rows[i] : rows[i + 1]] = F.linear(a[rows[i] : rows[i + 1]], w[i])
    return out


def _grouped_mm_usable(a: torch.Tensor, w: torch.Tensor) -> bool:
    if not (a.is_cuda and hasattr(torch, "_grouped_mm") and a.dtype == w.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    aligned = a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return aligned and a.shape[1] % 8 == 0 and w.shape[1] % 8 == 0 and a.is_contiguous() and w.is_contiguous()
