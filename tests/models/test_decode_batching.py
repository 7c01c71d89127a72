"""A decode step attends for all its sequences at once (a padded gather for short contexts, views one sequence at a
time for long ones) and builds its rotary tables once: the same numbers as each sequence decoding alone."""

import pytest
import torch

from krasis.common.kernels.cpu import decode_ops
from krasis.common.layers import attention
from krasis.common.layers.rotary import apply_rotary_half, apply_rotary_interleaved, half_tables, interleaved_tables
from krasis.common.model_loader import load_model
from krasis.common.sampling import SamplingParams
from krasis.common.sequence_state import forward_batch, schedule
from tests.models.conftest import checkpoint_dirs  # noqa: F401  (session fixture: tiny checkpoints)
from tests.models.harness import relative_error
from tests.models.test_exactness import prompt
from tests.models.test_generation import engine

# MLA (absorbed decode), GQA with a sliding window shorter than the prompts, Gated DeltaNet + gated attention
VARIANTS = ["deepseek_v2-lite", "qwen3_moe-sliding", "qwen3_next-base"]
LENGTHS = (3, 17, 41)
TOLERANCE = 1e-5  # fp32 rounding: the batched GEMMs sum in another order than one sequence's


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, checkpoint_dirs):  # noqa: F811
    return load_model(checkpoint_dirs(request.param), dtype=torch.float32)


def decode_step_hidden(model, lengths=LENGTHS) -> torch.Tensor:
    """Prefill prompts of `lengths` (each its first token), then one decode step of all of them -> hidden [B, H]."""
    core = engine(model)
    for n in lengths:
        core.add(f"p{n}", prompt(n, model.config.vocab_size, seed=n), SamplingParams(max_tokens=4, temperature=0.0))
    while any(seq.num_generated == 0 for seq in core.waiting + core.running):
        core.step()
    input_ids, batch = forward_batch(schedule(core.running, len(core.running)), core.kv, core.device)
    with torch.inference_mode():
        return model(input_ids, batch)


def test_decode_step_of_several_sequences_equals_each_alone(model):
    together = decode_step_hidden(model)
    alone = torch.cat([decode_step_hidden(model, (n,)) for n in LENGTHS])
    assert relative_error(together, alone) <= TOLERANCE


def test_decode_kernel_equals_the_torch_formulas(model, monkeypatch):
    kernel = decode_step_hidden(model)
    monkeypatch.setattr(decode_ops, "decode_attention", lambda *args: None)  # every layer on torch's GEMMs
    assert relative_error(kernel, decode_step_hidden(model)) <= TOLERANCE


def test_padded_gather_equals_attending_one_sequence_at_a_time(model, monkeypatch):
    monkeypatch.setattr(decode_ops, "decode_attention", lambda *args: None)  # the torch formulas, the CPU fallback
    gathers = []
    padded_context = attention.padded_context
    monkeypatch.setattr(attention, "padded_context", lambda *args: gathers.append(1) or padded_context(*args))
    gathered = decode_step_hidden(model)
    assert gathers, "short contexts should attend as one padded batch"
    monkeypatch.setattr(attention, "BATCHED_DECODE_BYTES", 0)  # every sequence on its own, reading views
    one_at_a_time = decode_step_hidden(model)
    assert len(gathers) == 1, "the padded gather indices are built once a step, for every layer"
    assert relative_error(gathered, one_at_a_time) <= TOLERANCE


def test_rotations_equal_the_reference_formulas_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen)
    angles = torch.rand(5, 4, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    # Llama/Qwen, partial (8 of 16 dims): x * cos + cat(-x2, x1) * sin on the rotary part
    c, s = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    part = x[..., :8]
    expected = torch.cat((part * c + torch.cat((-part[..., 4:], part[..., :4]), -1) * s, x[..., 8:]), -1)
    assert torch.equal(apply_rotary_half(x, half_tables(cos, sin, x.dtype)), expected)
    # DeepSeek: pairs (2i, 2i + 1) over all 8 dims of x[..., :8]
    even, odd = part[..., 0::2], part[..., 1::2]
    expected = torch.stack((even * cos[:, None] - odd * sin[:, None], even * sin[:, None] + odd * cos[:, None]), -1)
    assert torch.equal(apply_rotary_interleaved(part, interleaved_tables(cos, sin)), expected.flatten(-2))


def test_decode_reads_weights_replaced_after_a_step(checkpoint_dirs):  # noqa: F811
    """MLA keeps kv_b_proj's absorbed views and the router its transposed gate weight from step to step: new weight
    data (a reload, a .to()) must reach the next step, bit for bit as in a model that never decoded with the old."""
    stepped, fresh = (load_model(checkpoint_dirs("deepseek_v2-lite"), dtype=torch.float32) for _ in range(2))
    before = decode_step_hidden(stepped)
    for model in (stepped, fresh):
        for name, param in model.named_parameters():
            if name.endswith(("kv_b_proj.weight", "mlp.gate.weight")):
                param.data = param.data.flip(0)  # other heads' rows, other experts' scores
    after = decode_step_hidden(stepped)
    assert not torch.equal(after, before)
    assert torch.equal(after, decode_step_hidden(fresh))
