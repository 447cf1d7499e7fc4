"""One rank of the data-parallel tuning test (tests/test_distributed.py): gloo on CPU."""

import copy

import torch

from conftest import capture_block_inputs, tiny_llama

RANKS = 2
SAMPLES = 8
SEQLEN = 24
ITERS = 8
BATCH = 2
SEED = 5
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def problem():
    """The same block and samples in every process (seeded, CPU)."""
    model = tiny_llama(hidden=64, intermediate=72)
    return model, capture_block_inputs(model, nsamples=SAMPLES, seqlen=SEQLEN)


def spec_for(name):
    from autoround_fast.engine import QuantSpec

    return {"nvfp4": QuantSpec("nvfp4", act=True), "nvfp4a16": QuantSpec("nvfp4"),
            "w4a16-asym": QuantSpec("int", 4, 32, False, scale_dtype=torch.bfloat16)}[name]


def summary(block, res):
    return dict(losses=res.losses, best_iter=res.best_iter, q_outputs=res.q_outputs,
                weights={n: block.get_submodule(n).weight.detach().clone() for n in LINEARS},
                qparams=res.qparams)


def run(rank, scheme, iters, out_dir):
    import torch.distributed as dist

    from autoround_fast.engine import tune_block

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=RANKS)
    try:
        model, inputs = problem()
        share = SAMPLES // RANKS
        mine = inputs[rank * share:(rank + 1) * share]
        block = copy.deepcopy(model.model.layers[0])
        spec = spec_for(scheme)
        res = tune_block(block, mine, {n: spec for n in LINEARS}, iters=iters, batch_size=BATCH, seed=SEED,
                         token_mask=torch.ones(share, SEQLEN), backend="kernels")
        torch.save(summary(block, res), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
