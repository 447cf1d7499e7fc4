"""The memory fit (engine/memory.py): a block whose tuning would not fit its device's budget
gets its caches in host memory, then smaller micro-batches, and says so; the smaller
micro-batches tune exactly as the same settings given by hand; no fit is a clear error."""

import copy
import gc

import pytest
import torch
import torch.nn as nn

from torch.multiprocessing.reductions import StorageWeakRef

from autoround_fast.engine import QuantSpec, memory, precision, tune_block
from autoround_fast.engine.attention import eager_scores, sdpa_attention
from autoround_fast.engine.precision import cpu_tune_dtype
from conftest import capture_block_inputs, tiny_llama

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def block_and_inputs():
    model = tiny_llama()
    return model, capture_block_inputs(model, nsamples=8, seqlen=16)


def linears_of(model):
    return {n: model.model.layers[0].get_submodule(n) for n in LINEARS}


def test_the_estimate_counts_tunables_caches_and_one_micro_batch(block_and_inputs):
    """The loop: 12 bytes per tuned bf16 weight (V and its gradient, the saved and the best
    fake-quantized weight), the caches not held yet and one micro-batch's
    forward and backward; the reference pass before it: the fp inputs, the quantized inputs and
    the reference outputs at once, with one forward, which is the larger where the caches are."""
    model, _ = block_and_inputs
    lin = linears_of(model)
    weights = sum(m.weight.numel() for m in lin.values())
    forward = 4 * 16 * (sum(m.in_features + m.out_features for m in lin.values()) + 4 * 128) * 2
    cache = 8 * 16 * 128 * 2

    def estimate(batch=4, on_device=True, **kw):
        return memory.BlockMemory(lin, n_samples=8, tokens=16, hidden=128, elem=2, **kw).bytes(batch, on_device)

    assert estimate() == weights * 12 + 3 * cache + 2 * forward  # fp, quantized inputs, reference
    # weights the backward makes again, one unit at a time, are not held but for the largest unit
    units = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    remade = sum(lin[n].weight.numel() for n in units[0] + units[1])
    largest = max(sum(lin[n].weight.numel() for n in unit) for unit in units)
    assert estimate() - estimate(remade=units) == (remade - largest) * 2
    assert estimate() - estimate(on_device=False) == 3 * cache - 2 * 4 * 16 * 128 * 2  # two batches staged
    assert estimate() - estimate(resident=2) == 2 * cache  # the caller's inputs on the device are spent
    released = estimate(resident=2, release_inputs=True)
    assert estimate(resident=2) - released == cache  # the released fp inputs make room for the reference
    assert memory.live_caches(first_block=True, release_inputs=False) == 2  # its fp inputs are its quantized ones
    many = dict(n_samples=4096, tokens=16, hidden=128, elem=2, resident=2, release_inputs=True)
    assert memory.BlockMemory(lin, **many).bytes(4, True) == 4096 * 16 * 128 * 2 + forward  # the reference pass


def test_fit_gives_up_the_least_that_fits(block_and_inputs):
    model, _ = block_and_inputs
    block = memory.BlockMemory(linears_of(model), n_samples=64, tokens=512, hidden=128, elem=2)
    need = block.bytes
    kw = dict(batch=8, accumulate=1)
    assert memory.fit(block, **kw, budget=None, can_cache_on_host=True) == memory.Fit(False, 8, 1)
    assert memory.fit(block, **kw, budget=need(8, True), can_cache_on_host=True) == memory.Fit(False, 8, 1)
    host = memory.fit(block, **kw, budget=need(8, False), can_cache_on_host=True)
    assert (host.cache_on_host, host.batch_size, host.accumulate) == (True, 8, 1)
    assert "the cached activations go to host memory" in host.note
    split = memory.fit(block, **kw, budget=need(2, False), can_cache_on_host=True)
    assert (split.cache_on_host, split.batch_size, split.accumulate) == (True, 2, 4)
    assert "micro-batches of 2 with 4 accumulation steps (was 8 and 1)" in split.note
    on_device = memory.fit(block, **kw, budget=need(4, True), can_cache_on_host=False)
    assert (on_device.cache_on_host, on_device.batch_size, on_device.accumulate) == (False, 4, 2)
    with pytest.raises(ValueError, match=r"tune_block: the block's tuning needs about \d+ MiB and \d+ MiB is free, "
                                         r"and even micro-batches of 1 .*\(device_ids\)"):
        memory.fit(block, **kw, budget=need(1, False) - 1, can_cache_on_host=True)


def test_a_tight_budget_splits_the_micro_batch_as_the_same_settings_by_hand(block_and_inputs):
    """On the CPU, where caches cannot leave the device: a budget that fits micro-batches of 2
    but not 4 tunes as batch_size=2, gradient_accumulate_steps=2 given by hand, bit for bit."""
    model, inputs = block_and_inputs
    spec = {n: QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16) for n in LINEARS}
    lin = linears_of(model)
    elem = torch.empty(0, dtype=cpu_tune_dtype()).element_size()  # fp32 on a CPU without AVX512-BF16
    first = memory.BlockMemory(lin, 8, 16, 128, elem, first_block=True, resident=1)  # its fp inputs held
    budget = first.bytes(2, caches_on_device=True)
    runs = {}
    for name, kw in (("fit", dict(batch_size=4, memory_budget=budget)),
                     ("by hand", dict(batch_size=2, gradient_accumulate_steps=2))):
        block = copy.deepcopy(model.model.layers[0])
        res = tune_block(block, inputs, spec, iters=6, **kw)
        runs[name] = (res, {n: block.get_submodule(n).weight.clone() for n in LINEARS})
    (fit, wf), (hand, wh) = runs["fit"], runs["by hand"]
    assert "micro-batches of 2 with 2 accumulation steps (was 4 and 1)" in fit.memory_note and hand.memory_note == ""
    assert fit.losses == hand.losses and all(torch.equal(wf[n], wh[n]) for n in LINEARS)


def test_rtn_is_not_held_to_the_tuning_estimate(block_and_inputs):
    model, inputs = block_and_inputs
    spec = {n: QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16) for n in LINEARS}
    res = tune_block(copy.deepcopy(model.model.layers[0]), inputs, spec, iters=0, memory_budget=1)
    assert res.memory_note == ""
    with pytest.raises(ValueError, match="tune_block: the block's tuning needs about"):
        tune_block(copy.deepcopy(model.model.layers[0]), inputs, spec, iters=2, memory_budget=1)


def _packed_inputs(inputs):
    """The samples with their hidden states as rows of one tensor (as the modifier packs them on a
    GPU), and that tensor: pinned where a GPU is there, so that the engine takes it as its cache
    without a copy, as it takes the modifier's."""
    packed = torch.cat([args[0] for args, _ in inputs])
    packed = packed.pin_memory() if torch.cuda.is_available() else packed
    return [((packed[i: i + 1], *args[1:]), kw) for i, (args, kw) in enumerate(inputs)], packed


@pytest.mark.parametrize("later_block", [True, False])
def test_released_inputs_are_freed_before_the_loop_and_change_nothing(block_and_inputs, later_block):
    """release_inputs: in a block after the first, the fp hidden states' storage is freed before
    the loop runs (the engine's cache is the caller's packed tensor itself, as on a GPU); in
    a first block, whose quantized inputs they are, they stay. The tuned weights and losses are
    those of a run that keeps them, bit for bit."""
    model, inputs = block_and_inputs
    dtype = cpu_tune_dtype()  # the block's own: no cast, the engine's cache is the caller's tensor
    block0 = copy.deepcopy(model.model.layers[0]).to(dtype)
    cast = [((a[0].to(dtype), *a[1:]), kw) for a, kw in inputs]
    q_inputs = torch.cat([a[0] for a, _ in cast]) * 1.01 if later_block else None
    spec = {n: QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16) for n in LINEARS}
    runs = {}
    for release in (False, True):
        block = copy.deepcopy(block0)
        samples, packed = _packed_inputs(cast)
        storage = StorageWeakRef(packed.untyped_storage())
        del packed
        seen = []
        res = tune_block(block, samples, spec, iters=4, batch_size=4, q_inputs=q_inputs, release_inputs=release,
                         progress=lambda it, loss: seen.append(not storage.expired()))
        assert len(seen) == 4 and (samples == []) == release
        runs[release] = (res.losses, {n: block.get_submodule(n).weight.clone() for n in LINEARS}, seen)
    assert runs[False][2] == [True] * 4
    assert runs[True][2] == [not later_block] * 4
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in LINEARS)
    with pytest.raises(ValueError, match="release_inputs=True needs fp_inputs as a list"):
        tune_block(copy.deepcopy(block0), tuple(cast), spec, iters=1, release_inputs=True)


@pytest.mark.parametrize("kind", ["int", "mx"])  # V stepped in the backward, and by the separate step
def test_the_loop_keeps_the_best_weight_not_a_copy_of_v(block_and_inputs, kind, monkeypatch):
    """V's best is kept as the fake-quantized weight it gave, in the block's dtype (bf16 here,
    on any CPU), not as an fp32 copy of V: while the loop runs, no fp32 tensor of a weight's
    shape is alive beside the V parameters."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model, inputs = block_and_inputs
    block = copy.deepcopy(model.model.layers[0])
    shapes = {tuple(block.get_submodule(n).weight.shape) for n in LINEARS}
    spec = {n: QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16) if kind == "int" else QuantSpec("mx", 4, 32)
            for n in LINEARS}
    counts = []

    def count(it, loss):
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, nn.Parameter)
                          and o.dtype == torch.float32 and tuple(o.shape) in shapes))

    tune_block(block, inputs, spec, iters=3, batch_size=4, progress=count)
    assert counts == [0] * 3


def test_eagerly_run_attention_counts_its_score_matrices(block_and_inputs):
    """An eager attention that the engine does not swap for SDPA (off a GPU, or one with a
    sliding window, as GPT-OSS's) adds its heads x tokens x tokens scores per sample, 10 bytes
    each per sample of the micro-batch; one that SDPA computes adds nothing."""
    model, _ = block_and_inputs
    block = copy.deepcopy(model.model.layers[0])
    cfg = block.self_attn.config
    scores = cfg.num_attention_heads * 16 * 16
    cfg._attn_implementation = "sdpa"
    assert eager_scores(block, 16, on_gpu=False) == eager_scores(block, 16, on_gpu=True) == 0
    cfg._attn_implementation = "eager"
    assert (eager_scores(block, 16, on_gpu=False), eager_scores(block, 16, on_gpu=True)) == (scores, 0)
    cfg.sliding_window = 4
    assert eager_scores(block, 16, on_gpu=True) == scores
    with sdpa_attention(block):
        assert cfg._attn_implementation == "eager"  # left as it is: SDPA has no sliding window here
    lin = linears_of(model)
    plain, eager = (memory.BlockMemory(lin, 8, 16, 128, 2, scores=s).bytes(4, True) for s in (0, scores))
    assert eager - plain == 4 * scores * memory.EAGER_SCORE_BYTES
