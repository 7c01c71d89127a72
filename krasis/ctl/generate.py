"""`krasis-ctl generate`: offline generation for one prompt or chat message."""

import json
import sys

import click

from krasis.ctl.errors import user_errors
from krasis.ctl.loading import WeightOptions


@click.command()
@click.option("--model", "model_dir", type=click.Path(), help="Hugging Face model directory (default: the embedded tiny model).")
@click.option("--prompt", help="Raw prompt text, tokenized as is.")
@click.option("--chat", help="A user message, rendered with the model's chat template.")
@click.option("--system", help="A system message to go before --chat.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable); cut from the output.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS tokens.")
@click.option("--seed", type=int, help="Makes sampling reproducible.")
@click.option("--quant", default="none", show_default=True, help="Experts: none, q8 or q4 (q4:g64, q8:channel...).")
@click.option("--dense-quant", default="bf16", show_default=True, help="Attention, dense MLPs, lm_head: bf16, q8 or q4.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Quantized cache root [default: $KRASIS_CACHE_DIR].")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (ids, text, finish_reason) last.")
def generate(model_dir, prompt, chat, system, quant, dense_quant, cache_dir, dtype, device, as_json, **sampling):
    """Generate text from a prompt or a chat message, in this process."""
    with user_errors():
        weights = WeightOptions(model_dir, dtype, device, quant, dense_quant, cache_dir)
        _run(weights, prompt, chat, system, as_json, sampling)


def _run(weights, prompt, chat, system, as_json, sampling):
    if (prompt is None) == (chat is None):
        raise click.UsageError("give exactly one of --prompt and --chat")
    from krasis.ctl.loading import load_for_generation
    from krasis.common.generation import engine_for, generate as run_generation
    from krasis.common.sampling import SamplingParams

    params = SamplingParams(stop=tuple(sampling.pop("stop")), **sampling)
    model, tokenizer = load_for_generation(weights)
    params.validate(model.config.vocab_size)
    if chat is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat}]
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
    engine = engine_for(model, tokenizer, reserve_tokens=len(prompt_ids) + params.max_tokens)
    stream = None if as_json else (lambda _, delta: (sys.stdout.write(delta), sys.stdout.flush()))
    [result] = run_generation(engine, tokenizer, [prompt_ids], params, on_text=stream)
    if as_json:
        click.echo(json.dumps({
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": str(result.finish_reason),
        }, ensure_ascii=False))
    else:
        click.echo()
