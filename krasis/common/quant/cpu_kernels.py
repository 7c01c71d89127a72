"""CPU decode kernels: q8/q4 weights (one linear, and a layer's whole routed-expert MoE in one call), and
bf16 weights at decode sizes (up to DENSE_MAX_ROWS rows).

q8 weights multiply the activations as they are (fp32); q4 weights multiply activations quantized to
int8 per 32 values (`int8_activations`), in integer dot products: int4 unpacked to fp32 made q4 decode
compute-bound. bf16 weights meet bf16 activations (AVX-512 BF16 `vdpbf16ps` where the CPU has it), summed
in fp32 and rounded once, as F.linear. The C++ extension (csrc/) is built on first use with -march=native
into torch's extensions cache (`kernels/cpu/build.py`; torch's build lock keeps concurrent first uses to one build);
if it cannot build, the same functions run as dequantize-then-matmul in torch, after a one-line warning.
"""

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from krasis.common.kernels.cpu.build import build_or_warn, cpu_tag, load_extension
from krasis.common.layers.mlp import activation
from krasis.common.quant.formats import QuantizedWeight, dequantize

FORMAT_CODES = {"q8": 0, "q4": 1}  # as Q8 / Q4 in the C++ source
_CSRC = Path(__file__).parent / "csrc"  # quant_kernels.cpp and the headers it includes
_CPP_ACTIVATIONS = ("silu", "swish")
DENSE_MAX_ROWS = 16  # bf16_linear's kernel reads the weight once for all rows; above this torch's GEMM wins
_NO_BIAS = torch.empty(0, dtype=torch.bfloat16)
_EXPERTS_OK = -1  # the experts op's status: -1 done, >= 0 an unknown expert at that index of topk_ids, -2 bad input


def build_extension(march: str = "native", defines: tuple[str, ...] = (), source_dir: Path | None = None):
    """Compile (or reuse the cached build of) the kernels for -march=`march`; returns their torch.ops namespace.

    `defines` ("KRASIS_NR=8", ...) override the source's tuning constants, and `source_dir` replaces csrc/
    (another revision's kernels), for benchmarks.
    """
    csrc = source_dir or _CSRC
    source = csrc / "quant_kernels.cpp"
    # torch rebuilds when the .cpp changes, not a header it includes: the headers name the build.
    headers = hashlib.sha1(b"".join(h.read_bytes() for h in sorted(csrc.glob("*.h")))).hexdigest()[:6]
    variant = "default"
    if defines or source_dir:
        variant = hashlib.sha1(" ".join([*defines, str(source_dir or "")]).encode()).hexdigest()[:6]
    name = f"krasis_quant_{march.replace('-', '_')}_{cpu_tag()}_{variant}_{headers}"
    return load_extension(name, source, ["-O3", f"-march={march}", *(f"-D{d}" for d in defines)])


@functools.cache
def _ops():
    """The compiled ops, built once per process; None when they cannot be built here."""
    return _load_or_warn()


def _load_or_warn():
    return build_or_warn(build_extension, "CPU quant kernels", "dequantize-then-matmul")


def kernel_backend() -> str:
    """"cpp-avx512", "cpp-avx2", "cpp-scalar", or "torch" when the extension could not be built."""
    ops = _ops()
    return "torch" if ops is None else f"cpp-{ops.isa()}"


def bf16_backend() -> str:
    """bf16_linear's kernel: "cpp-avx512bf16" (vdpbf16ps), "cpp-avx512", "cpp-avx2", "cpp-scalar", or "torch"."""
    ops = _ops()
    return "torch" if ops is None else f"cpp-{ops.bf16_isa()}"


def quant_linear(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x: [M, K] bf16/fp32 on the CPU, qw: [N, K] -> [M, N] in x.dtype, accumulated in fp32."""
    ops = _ops()
    if ops is not None:  # the kernel tests x and the weight itself (~10 us of Python checks a call saved)
        y = ops.linear(x, qw.qweight, qw.scales, FORMAT_CODES[qw.spec.format], qw.spec.group_for(qw.shape[-1]))
        if y is not None:
            return y
    _check_x(x, qw, "quant_linear")  # raises, naming what does not fit
    if len(qw.shape) != 2:
        raise ValueError(f"quant_linear: weight {qw.shape} is not one [N, K] matrix")
    _check_cpu_layout(qw, "quant_linear")
    if ops is None:
        return torch_quant_linear(x, qw)
    raise ValueError(f"quant_linear: the kernel cannot read x {x.dtype} {tuple(x.shape)} with weight {qw.shape}")


def quant_experts(
    x: torch.Tensor,
    gate_up: QuantizedWeight,
    down: QuantizedWeight,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """x: [T, H], gate_up: [E, 2I, H], down: [E, H, I], topk_*: [T, k] -> [T, H] in x.dtype.

    For every (token, expert) pair down(act(gate) * up) * weight, summed over k in fp32. Pairs are
    grouped by expert, so each selected expert's weights are read once for all its tokens.
    """
    ops = _ops() if act in _CPP_ACTIVATIONS else None
    if ops is None:
        _check_experts(x, gate_up, down, topk_ids, topk_weights)
        return torch_quant_experts(x, gate_up, down, topk_ids, topk_weights, act)
    # The kernel tests its inputs itself (no Python checks on the decode path) and reports what it rejects.
    hidden, inter = gate_up.shape[-1], down.shape[-1]
    out, status = ops.experts(
        x, gate_up.qweight, gate_up.scales, FORMAT_CODES[gate_up.spec.format], gate_up.spec.group_for(hidden),
        down.qweight, down.scales, FORMAT_CODES[down.spec.format], down.spec.group_for(inter),
        topk_ids, topk_weights,
    )
    if status != _EXPERTS_OK:
        _check_experts(x, gate_up, down, topk_ids, topk_weights)  # raises, naming what does not fit
        if status >= 0:
            _raise_unknown_expert(topk_ids.reshape(-1)[status].item(), gate_up.shape[0])
        raise ValueError(
            f"quant_experts: the kernel cannot read x {x.dtype} {tuple(x.shape)}, topk_ids {topk_ids.dtype} on "
            f"{topk_ids.device}, topk_weights {topk_weights.dtype} on {topk_weights.device}"
        )
    return out


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bf16 CPU tensors, x: [M, K], weight: [N, K], bias: [N] -> [M, N] bf16, sums in fp32."""
    _check_bf16_linear(x, weight, bias)
    y = None if x.shape[0] == 0 else _dense_bf16(x, weight.contiguous(), bias, max_rows=x.shape[0])
    return F.linear(x, weight, bias) if y is None else y


def decode_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) through the bf16 kernel where it takes them (bf16 CPU tensors without autograd,
    x [..., K] of 1 to DENSE_MAX_ROWS rows, a contiguous weight), else None. The kernel tests all that itself:
    this runs for every linear of every decode token."""
    return _dense_bf16(x, weight, bias, DENSE_MAX_ROWS)


def _dense_bf16(x, weight, bias, max_rows: int) -> torch.Tensor | None:
    ops = _ops()
    return None if ops is None else ops.dense_bf16(x, weight, _NO_BIAS if bias is None else bias, max_rows)


def _check_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"bf16_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [M, K] and [N, K]")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
        raise ValueError("bf16_linear: x, weight and bias must be bf16 CPU tensors")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bf16_linear: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the q4 kernels see it: fp32, each 32 values rounded to d * int8 with d = max|x| / 127."""
    chunks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = chunks.abs().amax(-1, keepdim=True) / 127
    return torch.where(d > 0, torch.round(chunks / d), 0.0).mul(d).reshape(x.shape)


def kernel_input(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 activations the kernels multiply by `qw`: int8-rounded for q4, exact for q8."""
    return int8_activations(x) if qw.spec.format == "q4" else x.float()


def torch_quant_linear(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The fallback: dequantize to fp32, then one fp32 matmul."""
    return F.linear(kernel_input(x, qw), dequantize(qw)).to(x.dtype)


def torch_quant_experts(x, gate_up, down, topk_ids, topk_weights, act: str = "silu") -> torch.Tensor:
    """The fallback: per hit expert, dequantize its two matrices and run its tokens through them in fp32."""
    act_fn, (num_experts, inter) = activation(act), (down.shape[0], down.shape[-1])
    out = torch.zeros(x.shape, dtype=torch.float32)
    hit = torch.unique(topk_ids).tolist()
    if hit and not 0 <= hit[0] <= hit[-1] < num_experts:
        _raise_unknown_expert(hit[0] if hit[0] < 0 else hit[-1], num_experts)
    for expert in hit:
        token_idx, slot = torch.where(topk_ids == expert)
        h = F.linear(kernel_input(x[token_idx], gate_up), dequantize(gate_up[expert]))
        y = F.linear(kernel_input(act_fn(h[:, :inter]) * h[:, inter:], down), dequantize(down[expert]))
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)


def _raise_unknown_expert(expert: int, num_experts: int):
    raise ValueError(f"quant_experts: topk_ids holds expert {expert}; there are {num_experts}")


def _check_cpu_layout(qw: QuantizedWeight, what: str) -> None:
    # The C++ side reads raw pointers; checked here because its own checks throw, and a C++ throw
    # crashed the process on one machine (see experts() in the C++ source).
    for tensor in (qw.qweight, qw.scales):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{what}: quantized weight {qw.shape} must be contiguous CPU tensors")


def _check_x(x: torch.Tensor, qw: QuantizedWeight, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != qw.shape[-1]:
        raise ValueError(f"{what}: x {tuple(x.shape)} does not match weight {qw.shape}: expected [M, {qw.shape[-1]}]")
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"{what}: x must be a CPU fp32 or bf16 tensor, got {x.dtype} on {x.device}")


def _check_experts(x, gate_up: QuantizedWeight, down: QuantizedWeight, topk_ids, topk_weights) -> None:
    if len(gate_up.shape) != 3 or len(down.shape) != 3:
        raise ValueError(f"quant_experts: gate_up {gate_up.shape} and down {down.shape} must be [E, N, K] stacks")
    (num_experts, two_inter, hidden), inter = gate_up.shape, down.shape[-1]
    if down.shape != (num_experts, hidden, inter) or two_inter != 2 * inter:
        raise ValueError(
            f"quant_experts: gate_up {gate_up.shape} and down {down.shape} are not [E, 2I, H] and [E, H, I]"
        )
    _check_x(x, gate_up, "quant_experts")
    _check_cpu_layout(gate_up, "quant_experts")
    _check_cpu_layout(down, "quant_experts")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"quant_experts: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={x.shape[0]}, k]"
        )
