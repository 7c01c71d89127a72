"""Side by side: Hugging Face transformers on the same config and random weights, bf16, all on the device,
timed on the same prompts (prefill = one forward over the prompt; generate = greedy new tokens after it)."""

import time

import torch

from krasis.bench.models import fill_weights, weights_of
from krasis.bench.prompts import prompt_text, tokenize_prompt

MEMORY_MARGIN = 1.25  # weights plus activations and the KV of the longest prompt, roughly


def compare_transformers(model_dir, source_model, tokenizer, options) -> dict:
    """{"prefill_tok_s": {tokens: rate}, "generate_tok_s": {context: rate}} or {"skipped": why}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as exc:
        return {"skipped": f"transformers {_version()} lacks this architecture: {str(exc).splitlines()[0]}"}
    needed = sum(torch.Size(w.shape).numel() for _, w in weights_of(source_model)) * 2 * MEMORY_MARGIN
    free = _free_memory(options.device)
    if needed > free:
        return {"skipped": f"bf16 weights need ~{needed / 1e9:.1f} GB on {options.device}, {free / 1e9:.1f} GB free"}
    with torch.device(options.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    fill_weights(model, source_model)
    result = {"transformers": _version(), "prefill_tok_s": {}, "generate_tok_s": {}}
    _timed(options.device, lambda: model(torch.zeros(1, 64, dtype=torch.long, device=options.device)))  # warm-up
    for tokens in options.lengths:
        text = prompt_text(tokenizer, tokens, options.seed + tokens)  # the text krasis prefilled
        ids = torch.tensor([tokenize_prompt(tokenizer, text, tokens, config.vocab_size)], device=options.device)
        try:
            prefill_s = _timed(options.device, lambda: model(ids, logits_to_keep=1))
            if tokens in options.prompt_tokens:
                result["prefill_tok_s"][tokens] = tokens / prefill_s
            if tokens in options.decode_contexts:
                new = options.decode_tokens
                run = lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # noqa: E731
                result["generate_tok_s"][tokens] = new / max(_timed(options.device, run) - prefill_s, 1e-9)
        except torch.OutOfMemoryError:
            result.setdefault("out_of_memory", []).append(tokens)
            torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def _timed(device: str, fn) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _free_memory(device: str) -> float:
    if device == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        available = next(line for line in f if line.startswith("MemAvailable:"))
    return int(available.split()[1]) * 1024


def _version() -> str:
    import transformers

    return transformers.__version__
