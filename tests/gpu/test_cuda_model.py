"""The same model code on CUDA computes what it computes on the CPU (and what transformers computes)."""

import pytest
import torch

from krasis.common.model_loader import load_model
from tests.models.harness import median_token_error, reference_logits, relative_error, teacher_forced_logits
from tests.models.test_exactness import TOLERANCE, prompt
from tests.models.test_generation import GREEDY_32, engine, run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_matmul():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_fp32_logits_on_cuda_match_transformers(model_dir, reference, variant):
    tokens = prompt(80, reference.config.get_text_config().vocab_size)
    cuda = load_model(model_dir, dtype=torch.float32, device="cuda")
    err = relative_error(teacher_forced_logits(cuda, tokens), reference_logits(reference, tokens))
    assert err <= TOLERANCE, f"{variant}: CUDA fp32 relative logit error {err:.2e}"


def test_bf16_on_cuda_errs_no_more_than_transformers_bf16(model_dir, reference, variant):
    """bf16 vs exact, per token (bf16 rounding breaks near-tie router choices either way), against the reference's own bf16 error."""
    tokens = prompt(80, reference.config.get_text_config().vocab_size)
    exact = reference_logits(reference, tokens)
    reference_bf16 = reference_logits(reference.to(torch.bfloat16), tokens)
    cuda = load_model(model_dir, dtype=torch.bfloat16, device="cuda")
    ours_err = median_token_error(teacher_forced_logits(cuda, tokens), exact)
    reference_err = median_token_error(reference_bf16, exact)
    assert ours_err <= 2 * reference_err + 2e-3, f"{variant}: bf16 error {ours_err:.2e} vs {reference_err:.2e}"


def test_greedy_generation_on_cuda_equals_cpu(model_dir, ours, variant):
    cuda = load_model(model_dir, dtype=torch.float32, device="cuda")
    prompts = {f"p{n}": prompt(n, ours.config.vocab_size, seed=n) for n in (3, 17, 41)}
    assert run(engine(cuda), prompts, GREEDY_32) == run(engine(ours), prompts, GREEDY_32)
