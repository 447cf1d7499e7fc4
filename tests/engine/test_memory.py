"""The memory fit (engine/memory.py): a block whose tuning would not fit its device's budget
gets its caches in host memory, then smaller micro-batches, and says so; the smaller
micro-batches tune exactly as the same settings given by hand; no fit is a clear error."""

import copy

import pytest
import torch

from autoround_fast.engine import QuantSpec, memory, tune_block
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
    model, _ = block_and_inputs
    lin = linears_of(model)
    weights = sum(m.weight.numel() for m in lin.values())
    per_token = sum(m.in_features + m.out_features for m in lin.values()) + 4 * 128
    on = memory.tuning_bytes(lin, n_samples=8, tokens=16, hidden=128, batch=4, elem=2, caches_on_device=True)
    assert on == weights * 14 + 4 * 8 * 16 * 128 * 2 + 2 * 4 * 16 * per_token * 2
    off = memory.tuning_bytes(lin, n_samples=8, tokens=16, hidden=128, batch=4, elem=2, caches_on_device=False)
    assert on - off == (4 * 8 - 2 * 4) * 16 * 128 * 2  # the host keeps the caches; two batches are staged
    held = memory.tuning_bytes(lin, n_samples=8, tokens=16, hidden=128, batch=4, elem=2, caches_on_device=True,
                               resident=2)
    assert on - held == 2 * 8 * 16 * 128 * 2  # the caller's inputs on the device are spent, not needed


def test_fit_gives_up_the_least_that_fits(block_and_inputs):
    model, _ = block_and_inputs
    lin = linears_of(model)
    need = lambda b, dev: memory.tuning_bytes(lin, 64, 512, 128, b, 2, dev)  # noqa: E731
    kw = dict(n_samples=64, tokens=512, hidden=128, batch=8, accumulate=1, elem=2)
    assert memory.fit(lin, **kw, budget=None, can_cache_on_host=True) == memory.Fit(False, 8, 1)
    assert memory.fit(lin, **kw, budget=need(8, True), can_cache_on_host=True) == memory.Fit(False, 8, 1)
    host = memory.fit(lin, **kw, budget=need(8, False), can_cache_on_host=True)
    assert (host.cache_on_host, host.batch_size, host.accumulate) == (True, 8, 1)
    assert "the cached activations go to host memory" in host.note
    split = memory.fit(lin, **kw, budget=need(2, False), can_cache_on_host=True)
    assert (split.cache_on_host, split.batch_size, split.accumulate) == (True, 2, 4)
    assert "micro-batches of 2 with 4 accumulation steps (was 8 and 1)" in split.note
    on_device = memory.fit(lin, **kw, budget=need(4, True), can_cache_on_host=False)
    assert (on_device.cache_on_host, on_device.batch_size, on_device.accumulate) == (False, 4, 2)
    with pytest.raises(ValueError, match=r"tune_block: the block's tuning needs about \d+ MiB and \d+ MiB is free, "
                                         r"and even micro-batches of 1 .*\(device_ids\)"):
        memory.fit(lin, **kw, budget=need(1, False) - 1, can_cache_on_host=True)


def test_a_tight_budget_splits_the_micro_batch_as_the_same_settings_by_hand(block_and_inputs):
    """On the CPU, where caches cannot leave the device: a budget that fits micro-batches of 2
    but not 4 tunes as batch_size=2, gradient_accumulate_steps=2 given by hand, bit for bit."""
    model, inputs = block_and_inputs
    spec = {n: QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16) for n in LINEARS}
    lin = linears_of(model)
    budget = memory.tuning_bytes(lin, 8, 16, 128, 2, 2, True, resident=1)  # the fp inputs are there already
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
