"""The prefill model on the device: a copy of every weight except the routed experts, which stay in host
memory (the memory-mapped cache, or the CPU model's parameters) and reach the device through
`StreamedExperts`, resident or streamed. Generic over `model.model.layers`: any module of type
StackedExperts is replaced, whatever the architecture."""

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.kernels.gpu.dequant import block_scratch_bytes, dequantize_into
from krasis.common.kernels.gpu.fused_moe import DEQUANTIZE_FIRST_ROWS
from krasis.common.kernels.gpu.moe import moe_experts
from krasis.common.layers.attention import PAST_BLOCK, QUERY_BUCKET, cudnn_shapes_ok
from krasis.common.layers.moe import StackedExperts
from krasis.common.layers.norm import RMSNorm
from krasis.common.quant.formats import QuantizedWeight, dequantize
from krasis.common.quant.modules import QuantLinear
from krasis.gpu_worker.vram_plan import BUFFER_ALIGN, ActivationShape, LayerWeights, ModelWeights


class StreamedExperts(nn.Module):
    """A layer's routed experts on the device: `host_tensors` are the bytes to copy (q4/q8 values and scales,
    or the float stacks); `bind` points the layer at device copies of them, in the same order."""

    def __init__(self, layer_index: int, host: StackedExperts):
        super().__init__()
        self.layer_index, self.num_experts, self.hidden_act = layer_index, host.num_experts, host.hidden_act
        if host.quantized:
            gate_up, down = host.quantized["gate_up_proj"], host.quantized["down_proj"]
            self.quant = ((gate_up.spec, gate_up.shape), (down.spec, down.shape))
            tensors = [gate_up.qweight, gate_up.scales, down.qweight, down.scales]
        else:
            self.quant = None
            tensors = [host.gate_up_proj.detach(), host.down_proj.detach()]
        self.host_tensors = [t.contiguous() for t in tensors]
        self.device_weights = None  # (gate_up, down) while bound
        self.scratch_bytes = 0  # what the VRAM plan holds for dequantizing these experts ahead of their GEMMs

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.host_tensors)

    @property
    def gate_up_shape(self) -> tuple[int, ...]:
        return self.quant[0][1] if self.quant else tuple(self.host_tensors[0].shape)

    def stand_in(self, device, num_experts: int = 2) -> tuple:
        """(gate_up, down) device weights of this layer's format and shape but `num_experts` experts, zeros (kernel
        compilation)."""
        if not self.quant:
            return tuple(torch.zeros(num_experts, *t.shape[1:], dtype=t.dtype, device=device) for t in self.host_tensors)
        weights = []
        for (spec, shape), (values, scales) in zip(self.quant, (self.host_tensors[:2], self.host_tensors[2:])):
            stand = [torch.zeros(num_experts, *t.shape[1:], dtype=t.dtype, device=device) for t in (values, scales)]
            weights.append(QuantizedWeight(spec, (num_experts, *shape[1:]), *stand))
        return tuple(weights)

    def bind(self, tensors: list[torch.Tensor] | None) -> None:
        if tensors is None:
            self.device_weights = None
        elif self.quant:
            (spec_gu, shape_gu), (spec_d, shape_d) = self.quant
            self.device_weights = (QuantizedWeight(spec_gu, shape_gu, *tensors[:2]), QuantizedWeight(spec_d, shape_d, *tensors[2:]))
        else:
            self.device_weights = tuple(tensors)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_*: [T, k] -> [T, H]
        if self.device_weights is None:
            raise RuntimeError(f"layer {self.layer_index}: routed experts are neither resident nor streamed in")
        return moe_experts(x, *self.device_weights, topk_ids, topk_weights, self.hidden_act, self.scratch_bytes)


def buffer_views(buffer: torch.Tensor, tensors: list[torch.Tensor], offset: int = 0) -> tuple[list[torch.Tensor], int]:
    """Views of a uint8 buffer shaped like `tensors`, each at a BUFFER_ALIGN boundary from `offset`; (views, end)."""
    views = []
    for t in tensors:
        views.append(buffer[offset : offset + t.nbytes].view(t.dtype).view(t.shape))
        offset += -(-t.nbytes // BUFFER_ALIGN) * BUFFER_ALIGN
    return views, offset


def _experts_modules(model) -> dict[str, StackedExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def _layer_of(name: str) -> int:
    return int(name.split("model.layers.", 1)[1].split(".", 1)[0])


class HostLmHead(nn.Module):
    """An lm_head left in host memory: the few rows prefill samples from go to the host for their logits and back."""

    def __init__(self, host: nn.Module):
        super().__init__()
        self.host = host

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x.cpu()).to(x.device)


class DequantScratch(nn.Module):
    """Where the device's quantized linears are dequantized before their GEMMs: one region per position of a linear
    within its layer (`scratch_layout`), so a layer's linears never overwrite each other, and a region remembers whose
    weight it holds: the chunks of a step after the first, which run the same layer next, reuse it."""

    def __init__(self, numel: int, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("buffer", torch.empty(numel, dtype=dtype, device=device), persistent=False)
        self.holder: dict[int, "DeviceQuantLinear"] = {}  # region offset -> the linear whose weight it holds

    def weight(self, linear: "DeviceQuantLinear") -> torch.Tensor:
        n, k = linear.weight_q.shape
        view = self.buffer[linear.offset : linear.offset + n * k].view(n, k)
        if self.holder.get(linear.offset) is not linear:
            dequantize_into(linear.weight_q, view)  # the bits `dequantize` gives: the same products as a bf16 copy
            self.holder[linear.offset] = linear
        return view


class DeviceQuantLinear(nn.Module):
    """A quantized linear (QuantLinear's weight) kept on the device as stored, a quarter (q4) or half (q8) of its
    bf16 bytes, and dequantized into its scratch region when called (once a step and layer: see DequantScratch)."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None, scratch: DequantScratch, offset: int):
        super().__init__()
        self.register_buffer("qweight", weight.qweight, persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)
        self.weight_q, self.bias, self.offset = weight, bias, offset
        self.scratch = [scratch]  # in a list: not a submodule of every linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.scratch[0].weight(self), self.bias)


def scratch_layout(model) -> tuple[dict[str, int], int]:
    """({name of a decoder layer's QuantLinear: its region's offset in the scratch}, scratch elements): the k-th
    quantized linear of every layer shares region k, as large as the largest k-th one."""
    sizes: list[int] = []
    position: dict[str, int] = {}
    for layer_name, layer in model.model.layers.named_children():
        linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, QuantLinear)]
        for k, (name, linear) in enumerate(linears):
            position[f"model.layers.{layer_name}.{name}"] = k
            sizes += [0] * (k + 1 - len(sizes))
            sizes[k] = max(sizes[k], linear.weight_q.shape[0] * linear.weight_q.shape[1])
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    return {name: offsets[k] for name, k in position.items()}, sum(sizes)


def build_device_model(model, device, host_embedding: bool = False,
                       host_lm_head: bool = False) -> tuple[nn.Module, dict[int, StreamedExperts]]:  # fmt: skip
    """(device copy of `model` without its routed experts, {layer index: its StreamedExperts}); `model` is untouched.
    With `host_embedding` the copy shares `model`'s input embedding module, on the host; with `host_lm_head` its
    lm_head (through HostLmHead)."""
    with torch.device("meta"):
        clone = type(model)(model.config)
    if host_embedding:
        clone.model.embed_tokens = model.model.embed_tokens
    if host_lm_head:
        clone.lm_head = HostLmHead(model.lm_head)
    experts = {}
    for name, host in _experts_modules(model).items():
        parent, _, child = name.rpartition(".")
        experts[_layer_of(name)] = StreamedExperts(_layer_of(name), host)
        setattr(clone.get_submodule(parent), child, experts[_layer_of(name)])
    copied: dict[int, torch.Tensor] = {}  # id of a host tensor -> its device copy (keeps tied weights tied)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copied:
            copied[id(t)] = t.detach().to(device)
        return copied[id(t)]

    skip = tuple(f"{name}." for name in _experts_modules(model))
    layout, scratch_numel = scratch_layout(model)
    if scratch_numel:
        clone.dequant_scratch = DequantScratch(scratch_numel, model.model.embed_tokens.weight.dtype, device)
    for name, module in model.named_modules():
        host = module is clone.model.embed_tokens or (host_lm_head and module is model.lm_head)
        if isinstance(module, StackedExperts) or name.startswith(skip) or host:
            continue
        if isinstance(module, QuantLinear):
            qw, bias = module.weight_q, module.bias
            weight = QuantizedWeight(qw.spec, qw.shape, to_device(qw.qweight), to_device(qw.scales))
            if name in layout:  # a decoder layer's: kept as stored
                bias = None if bias is None else nn.Parameter(to_device(bias), requires_grad=False)
                parent, _, child = name.rpartition(".")
                linear = DeviceQuantLinear(weight, bias, clone.dequant_scratch, layout[name])
                setattr(clone.get_submodule(parent), child, linear)
                continue
            # outside the layers (a quantized lm_head): dequantized once, as its scratch would be as large
            clone.get_submodule(name).weight = nn.Parameter(dequantize(weight, model.model.embed_tokens.weight.dtype),
                                                            requires_grad=False)  # fmt: skip
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            setattr(target, pname, nn.Parameter(to_device(param), requires_grad=False))
        for bname, buf in module.named_buffers(recurse=False):
            setattr(target, bname, to_device(buf))
    left = [n for n, t in [*clone.named_parameters(), *clone.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"device model: no weights copied for {left[:5]}")
    return clone.eval().requires_grad_(False), experts


def _device_bytes(module: nn.Module, dtype: torch.dtype, skip_ids: set[int], counted: set[int], stored: bool) -> int:
    """Bytes `module`'s own tensors take on the device, each tensor once; a QuantLinear's as stored (`stored`: a
    decoder layer's) or dequantized to `dtype`."""
    total = 0
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if id(t) not in skip_ids and id(t) not in counted:
            counted.add(id(t))
            total += t.nbytes
    if isinstance(module, QuantLinear) and id(module) not in counted:  # its weight is no tensor of the module's
        counted.add(id(module))
        n, k = module.weight_q.shape
        total += module.weight_q.nbytes if stored else n * k * dtype.itemsize
    return total


def measure_weights(model) -> ModelWeights:
    """Byte counts for the planner: per layer resident and routed-expert bytes, and the rest of the model."""
    dtype = model.model.embed_tokens.weight.dtype
    experts = _experts_modules(model)
    expert_ids = {id(t) for m in experts.values() for t in [*m.parameters(), *m.buffers()]}
    counted: set[int] = set()
    layers = []
    for i, layer in enumerate(model.model.layers):
        resident = sum(_device_bytes(m, dtype, expert_ids, counted, True) for m in layer.modules()
                       if not isinstance(m, StackedExperts))  # fmt: skip
        routed = sum(StreamedExperts(i, m).nbytes for m in layer.modules() if isinstance(m, StackedExperts))
        layers.append(LayerWeights(i, resident, routed))
    other = sum(_device_bytes(m, dtype, expert_ids, counted, False) for m in model.modules())  # what no layer counted
    other += scratch_layout(model)[1] * dtype.itemsize  # where the layers' quantized linears are dequantized
    embedding = model.model.embed_tokens.weight
    untied = embedding is not getattr(model.lm_head, "weight", None)
    lm_head = _device_bytes(model.lm_head, dtype, set(), set(), False) if untied else 0
    return ModelWeights(other, tuple(layers), embedding.nbytes if untied else 0, lm_head)


def attention_widths(config) -> tuple[int, int, int]:
    """(query heads, q/k head width, v head width) of a model's softmax attention (MLA: q/k are nope + rope)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qk_dim = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0) or head_dim
    return heads, qk_dim, getattr(config, "v_head_dim", None) or head_dim


def activation_shape(model, kv_dtype_bytes: int | None = None, cudnn: bool = False,
                     fused_norms: bool = False) -> ActivationShape:  # fmt: skip
    """The planner's view of prefill activations, from the model's config (DeepSeek MLA, GQA, linear attention);
    `cudnn`: the device runs cuDNN's fused attention, through which MLA expands its context a block at a time;
    `fused_norms`: its RMSNorms run as one kernel (kernels.gpu.rowwise), without fp32 copies of their rows."""
    cfg, dtype = model.config, model.model.embed_tokens.weight.dtype
    d, (heads, qk_dim, v_dim) = dtype.itemsize, attention_widths(cfg)
    kv_width = max(model.kv_widths)
    # per context token: the cached row read back, K and V expanded to every head; MLA also up-projects the latent
    # (kv_b_proj: nope + v per head) before K is assembled
    expanded = heads * (qk_dim + v_dim) * d + (heads * (qk_dim - getattr(cfg, "qk_rope_head_dim", 0) + v_dim) * d
                                               if getattr(cfg, "kv_lora_rank", None) else 0)  # fmt: skip
    experts = list(_experts_modules(model).values())
    squares = cudnn and cudnn_shapes_ok(dtype, qk_dim, v_dim)  # chunks attend through attend_chunk_blockwise
    blockwise = squares and getattr(cfg, "kv_lora_rank", None) is not None
    return ActivationShape(
        hidden_size=cfg.hidden_size, top_k=getattr(cfg, "num_experts_per_tok", 0) if experts else 0,
        expert_width=experts[0].intermediate_size if experts else getattr(cfg, "intermediate_size", cfg.hidden_size),
        num_heads=heads, attn_bytes_per_context_token=kv_width * d + expanded,
        layer_kv_bytes_per_token=kv_width * (kv_dtype_bytes or d), dtype_bytes=d, num_experts=experts[0].num_experts if experts else 0,
        state_bytes_per_seq=4 * sum(model.state_widths),
        attention_block=PAST_BLOCK if blockwise else 0,
        query_bucket=QUERY_BUCKET if squares else 0,
        expert_scratch_bytes=expert_scratch_bytes(experts[0], d) if experts else 0,
        dequantize_first_rows=DEQUANTIZE_FIRST_ROWS,
        norm_fp32_copies=not (fused_norms and dtype in (torch.bfloat16, torch.float16) and _plain_norms(model)),
    )  # fmt: skip


def _plain_norms(model) -> bool:
    """Whether every norm of the decoder layers is an RMSNorm, whose GPU path is the fused row-wise kernel."""
    norms = [m for layer in model.model.layers for name, m in layer.named_modules() if name.endswith("norm")]
    return bool(norms) and all(type(m) is RMSNorm for m in norms)


def expert_scratch_bytes(experts: StackedExperts, dtype_bytes: int) -> int:
    """The float scratch quantized experts are dequantized into a block at a time (kernels.gpu.moe and fused_moe)."""
    return block_scratch_bytes(experts.quantized["gate_up_proj"].shape, dtype_bytes) if experts.quantized else 0
