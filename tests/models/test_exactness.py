"""Our models compute what transformers computes, in fp32, for every config variant."""

import torch

from tests.models.harness import (
    SingleSequence,
    median_token_error,
    reference_logits,
    relative_error,
    teacher_forced_logits,
)

TOLERANCE = 1e-4  # max abs error over the logits' max abs value


def prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def test_teacher_forced_logits_match_transformers(ours, reference, variant):
    # 80 tokens: longer than YaRN's original context (32), the sliding window (12) and several KV pages
    tokens = prompt(80, ours.config.vocab_size)
    err = relative_error(teacher_forced_logits(ours, tokens), reference_logits(reference, tokens))
    assert err <= TOLERANCE, f"{variant}: relative logit error {err:.2e}"


def test_decode_with_kv_cache_equals_recompute(ours, variant):
    tokens = prompt(40, ours.config.vocab_size, seed=1)
    full = teacher_forced_logits(ours, tokens)
    seq = SingleSequence(ours, len(tokens))
    pieces = [seq.feed(tokens[:17])] + [seq.feed([t]) for t in tokens[17:30]] + [seq.feed(tokens[30:])]
    err = relative_error(torch.cat(pieces), full)
    assert err <= TOLERANCE, f"{variant}: cached decode differs from recompute by {err:.2e}"


def test_bf16_errs_no_more_than_transformers_bf16(model_dir, reference, variant):
    """bf16 (our default) vs exact, per token (bf16 rounding breaks near-tie router choices either way), against the reference's own bf16."""
    from krasis.common.model_loader import load_model

    vocab_size = reference.config.get_text_config().vocab_size  # a multimodal wrapper keeps it in text_config
    tokens = prompt(80, vocab_size, seed=4)
    exact = reference_logits(reference, tokens)
    reference_err = median_token_error(reference_logits(reference.to(torch.bfloat16), tokens), exact)
    ours_err = median_token_error(teacher_forced_logits(load_model(model_dir, dtype=torch.bfloat16), tokens), exact)
    assert ours_err <= 2 * reference_err + 2e-3, f"{variant}: bf16 error {ours_err:.2e} vs {reference_err:.2e}"


def test_bf16_layers_leaving_the_residual_add_to_the_next_norm_equal_whole_layers(model_dir, variant, monkeypatch):
    """CausalLM.forward adds each layer's MLP output inside the next norm (one fused kernel call on the CPU in bf16):
    the same bits as running every layer whole, in prefill and in decode."""
    from krasis.common.model_loader import load_model

    def whole_layers(model, input_ids, batch):
        x = model.model.embed_tokens(input_ids)
        for layer in model.model.layers:
            x = layer(x, batch)
        return model.model.norm(x)

    def logits(model, tokens):
        seq = SingleSequence(model, len(tokens))
        return torch.cat([seq.feed(tokens[:9])] + [seq.feed([t]) for t in tokens[9:]])

    model = load_model(model_dir, dtype=torch.bfloat16)
    tokens = prompt(16, model.config.vocab_size, seed=5)
    carried = logits(model, tokens)
    monkeypatch.setattr(type(model), "forward", whole_layers)
    assert torch.equal(carried, logits(model, tokens)), variant
