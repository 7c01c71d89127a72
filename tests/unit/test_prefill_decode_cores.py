"""Prefill on GpuPrefillCore, decode on CpuDecodeCore over shared KV pages: the same tokens as EngineCore."""

import multiprocessing

import pytest
import torch

from krasis.common.kv_cache import KVCache, PageAllocator
from krasis.common.model_loader import load_model
from krasis.common.protocol import FinishReason
from krasis.common.protocol_pipeline import AddRequest, HandOff, TokenBatch
from krasis.common.sampling import SamplingParams
from krasis.common.shm import SharedKVPool, shared_kv_cache
from krasis.common.wire import decode, encode
from krasis.cpu_worker.core import CpuDecodeCore
from krasis.gpu_worker.core import GpuPrefillCore
from tests.models.conftest import checkpoint_dirs  # noqa: F401  (session fixture: tiny checkpoints)
from tests.models.test_exactness import prompt
from tests.models.test_generation import engine, run

VARIANTS = ["qwen3_moe-base", "deepseek_v2-lite"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
PAGE_SIZE = 16
CHUNK = 16  # max_batch_tokens: the 41-token prompt prefills in three chunks


@pytest.fixture(scope="module")
def models(checkpoint_dirs):  # noqa: F811
    loaded = {}

    def get(variant: str):
        if variant not in loaded:
            loaded[variant] = load_model(checkpoint_dirs(variant), dtype=torch.float32)
        return loaded[variant]

    return get


def prompts_for(model) -> dict[str, list[int]]:
    return {f"p{n}": prompt(n, model.config.vocab_size, seed=n) for n in (3, 17, 41)}


def new_kv(model, pages: int = 32) -> KVCache:
    return KVCache.allocate(model.kv_widths, pages, PAGE_SIZE, torch.float32, "cpu")


class Pipeline:
    """The two cores over one KV cache, with the scheduler's part (page allocation) played by the test."""

    def __init__(self, model, kv: KVCache, eos: frozenset[int] = frozenset(), **prefill_options):
        self.model, self.kv, self.allocator = model, kv, PageAllocator(kv.num_pages)
        self.max_context = model.config.max_position_embeddings
        vocab = model.config.vocab_size
        self.prefill = GpuPrefillCore(model, kv, eos, vocab, CHUNK, max_context=self.max_context, **prefill_options)
        self.decode = CpuDecodeCore(model, kv, eos, vocab, self.max_context)
        self.events, self.hand_offs = [], []

    def add(self, rid: str, ids: list[int], params: SamplingParams) -> AddRequest:
        pages = self.kv.pages_for(min(len(ids) + params.max_tokens, self.max_context))
        request = AddRequest(rid, ids, params, self.allocator.allocate(pages))
        self.prefill.add(request)
        return request

    def step(self) -> None:
        tokens, hand_offs = self.prefill.step()
        self.events += tokens
        self.hand_offs += hand_offs
        for hand_off in hand_offs:
            self.decode.add(hand_off)
        self.events += self.decode.step()

    def prefill_until_hand_off(self) -> HandOff:
        while not self.hand_offs:
            tokens, hand_offs = self.prefill.step()
            self.events += tokens
            self.hand_offs += hand_offs
        return self.hand_offs[0]

    def run(self) -> dict[str, list[int]]:
        while self.prefill.has_work or self.decode.has_work:
            self.step()
        return tokens_by_request(self.events)


def tokens_by_request(events) -> dict[str, list[int]]:
    """Tokens in output order; checks indices are 0..n-1 and exactly the last event carries a finish reason."""
    out = {}
    for rid in dict.fromkeys(e.request_id for e in events):
        mine = sorted((e for e in events if e.request_id == rid), key=lambda e: e.index)
        assert [e.index for e in mine] == list(range(len(mine))), f"{rid}: output indices have gaps"
        assert [e.finish_reason is not None for e in mine] == [False] * (len(mine) - 1) + [True]
        out[rid] = [e.token_id for e in mine if e.token_id is not None]
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_then_decode_equals_engine_tokens(models, variant, params):
    model = models(variant)
    prompts = prompts_for(model)
    expected = run(engine(model), prompts, params)
    pipeline = Pipeline(model, new_kv(model))
    for rid, ids in prompts.items():
        pipeline.add(rid, ids, params)
    assert pipeline.run() == expected, f"{variant}: the pipeline's tokens differ from EngineCore's"
    assert all(len(tokens) == params.max_tokens for tokens in expected.values())


def test_staged_prefill_writes_the_same_pool_kv_as_direct_prefill(models):
    # The cuda path (model attends over a device staging cache, KV copied to the host pool), run on cpu.
    model = models("deepseek_v2-lite")
    prompts = prompts_for(model)
    direct, staged = Pipeline(model, new_kv(model)), Pipeline(model, new_kv(model), staging_pages=6)
    for pipeline in (direct, staged):
        for rid, ids in prompts.items():
            pipeline.add(rid, ids, GREEDY)
        while pipeline.prefill.has_work:
            pipeline.events += pipeline.prefill.step()[0]
    for direct_layer, staged_layer in zip(direct.kv.layers, staged.kv.layers):
        assert torch.equal(direct_layer, staged_layer)
    assert staged.prefill.staging.pages.num_free == 6, "finished prefills must release their staging pages"


def test_hand_off_kv_layers_decode_on_a_separate_cache(models):
    model = models("qwen3_moe-base")
    ids = prompts_for(model)["p17"]
    expected = run(engine(model), {"a": ids}, GREEDY)["a"]
    pipeline = Pipeline(model, new_kv(model))
    pipeline.add("a", ids, GREEDY)
    h = pipeline.prefill_until_hand_off()
    slots = pipeline.kv.slots(h.page_table, 0, len(h.token_ids) - 1)
    kv_layers = [pipeline.kv.read(layer, slots) for layer in range(len(pipeline.kv.layers))]
    remote = CpuDecodeCore(model, new_kv(model), frozenset(), model.config.vocab_size, pipeline.max_context)
    remote.add(HandOff(h.request_id, h.token_ids, h.num_prompt_tokens, h.page_table, h.sampling, kv_layers))
    events = []
    while remote.has_work:
        events += remote.step()
    assert [h.token_ids[-1]] + [e.token_id for e in events] == expected


def _decode_in_child(conn, model_dir: str, pool: dict, max_context: int) -> None:
    torch.set_num_threads(1)
    model = load_model(model_dir, dtype=torch.float32)
    kv = shared_kv_cache(SharedKVPool.attach(pool))
    core = CpuDecodeCore(model, kv, frozenset(), model.config.vocab_size, max_context)
    core.add(decode([conn.recv_bytes()]))
    events = []
    while core.has_work:
        events += core.step()
    conn.send_bytes(encode(TokenBatch(events))[0])


def test_decode_in_another_process_continues_from_the_shared_pool(models, checkpoint_dirs):  # noqa: F811
    variant = "deepseek_v2-lite"
    model = models(variant)
    ids = prompts_for(model)["p41"]
    expected = run(engine(model), {"a": ids}, SEEDED)["a"]
    with SharedKVPool.create("krasis-test-kv", model.kv_widths, 16, PAGE_SIZE, torch.float32) as pool:
        pipeline = Pipeline(model, shared_kv_cache(pool))
        pipeline.add("a", ids, SEEDED)
        pipeline.prefill_until_hand_off()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        args = (child, str(checkpoint_dirs(variant)), pool.descriptor.as_dict(), pipeline.max_context)
        worker = ctx.Process(target=_decode_in_child, args=args, daemon=True)
        worker.start()
        [frame] = encode(pipeline.hand_offs[0])
        parent.send_bytes(bytes(frame))
        assert parent.poll(120), "the decode process sent no tokens"
        pipeline.events += decode([parent.recv_bytes()]).events
        worker.join(30)
    assert worker.exitcode == 0
    assert tokens_by_request(pipeline.events)["a"] == expected


def test_abort_during_prefill_stops_its_tokens_and_hand_off(models):
    model = models("qwen3_moe-base")
    prompts = prompts_for(model)
    expected = run(engine(model), {"p3": prompts["p3"]}, GREEDY)
    pipeline = Pipeline(model, new_kv(model))
    requests = [pipeline.add(rid, prompts[rid], GREEDY) for rid in ("p41", "p3")]
    pipeline.step()  # p41 is mid-prefill (16 of 41 tokens)
    pipeline.prefill.abort("p41")
    pool_before = [layer.clone() for layer in pipeline.kv.layers]
    assert pipeline.run() == expected
    assert all(h.request_id != "p41" for h in pipeline.hand_offs)
    for before, after in zip(pool_before, pipeline.kv.layers):
        p41_slots = pipeline.kv.slots(requests[0].page_table, 0, 41)
        assert torch.equal(before[p41_slots], after[p41_slots]), "aborted pages must be left alone"


def test_abort_during_decode_stops_its_tokens_and_others_continue(models):
    model = models("deepseek_v2-lite")
    prompts = prompts_for(model)
    expected = run(engine(model), {"p17": prompts["p17"]}, GREEDY)
    pipeline = Pipeline(model, new_kv(model))
    for rid in ("p3", "p17"):
        pipeline.add(rid, prompts[rid], GREEDY)
    while len(pipeline.decode.running) < 2:
        pipeline.step()
    pipeline.decode.abort("p3")
    emitted = sum(e.request_id == "p3" for e in pipeline.events)
    while pipeline.decode.has_work:
        pipeline.step()
    assert sum(e.request_id == "p3" for e in pipeline.events) == emitted, "an aborted sequence emitted tokens"
    assert tokens_by_request([e for e in pipeline.events if e.request_id == "p17"]) == expected


def test_eos_as_first_token_ends_in_prefill_without_hand_off(models):
    model = models("qwen3_moe-base")
    ids = prompts_for(model)["p17"]
    first = run(engine(model), {"a": ids}, GREEDY)["a"][0]
    pipeline = Pipeline(model, new_kv(model), eos=frozenset({first}))
    pipeline.add("a", ids, GREEDY)
    pipeline.run()
    assert pipeline.hand_offs == []
    [event] = pipeline.events
    assert (event.index, event.token_id, event.finish_reason) == (0, None, FinishReason.STOP)


def test_max_tokens_one_ends_in_prefill_with_length(models):
    model = models("qwen3_moe-base")
    pipeline = Pipeline(model, new_kv(model))
    pipeline.add("a", prompts_for(model)["p3"], SamplingParams(max_tokens=1, temperature=0.0))
    pipeline.run()
    assert pipeline.hand_offs == [] and [e.finish_reason for e in pipeline.events] == [FinishReason.LENGTH]


def test_page_tables_too_short_for_the_sequence_are_refused(models):
    model = models("qwen3_moe-base")
    kv, vocab = new_kv(model), model.config.vocab_size
    prefill = GpuPrefillCore(model, kv, frozenset(), vocab, CHUNK, max_context=256)
    with pytest.raises(ValueError, match="cannot hold 17 tokens"):
        prefill.add(AddRequest("a", list(range(17)), GREEDY, [0]))
    decoder = CpuDecodeCore(model, kv, frozenset(), vocab, 256)
    with pytest.raises(ValueError, match="cannot hold"):  # prompt 17 + 12 tokens need 2 pages
        decoder.add(HandOff("a", list(range(18)), 17, [0], GREEDY, []))
    assert not prefill.has_work and not decoder.has_work


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_prompt_ids_outside_the_vocabulary_are_refused(models, bad):
    model = models("qwen3_moe-base")
    kv, vocab = new_kv(model), model.config.vocab_size
    token = vocab if bad == "vocab" else bad
    prefill = GpuPrefillCore(model, kv, frozenset(), vocab, CHUNK, max_context=256)
    with pytest.raises(ValueError, match=f"token id {token} is outside the vocabulary"):
        prefill.add(AddRequest("a", [1, 2, token, 3], GREEDY, [0]))
    decoder = CpuDecodeCore(model, kv, frozenset(), vocab, 256)
    with pytest.raises(ValueError, match=f"token id {token} is outside the vocabulary"):
        decoder.add(HandOff("a", [1, 2, token, 3, 4], 4, [0], GREEDY, []))
    assert not prefill.has_work and not decoder.has_work
