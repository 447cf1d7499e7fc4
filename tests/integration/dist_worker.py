"""One rank of the data-parallel tuning test (tests/test_distributed.py): gloo and the CPU
kernels, or NCCL and the CUDA kernels with one GPU per rank."""

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
    """What the test compares, on the CPU."""
    cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
    return dict(losses=res.losses, best_iter=res.best_iter, q_outputs=cpu(res.q_outputs),
                weights={n: cpu(block.get_submodule(n).weight) for n in LINEARS},
                qparams={n: {k: cpu(v) for k, v in qp.items()} for n, qp in res.qparams.items()})


def join_group(rank, out_dir, dev):
    """This process joins the test's group: gloo on the CPU, or NCCL with GPU `rank` (dev
    "cuda", "cuda-spread"). True for the latter."""
    import torch.distributed as dist

    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=RANKS, **({"device_id": torch.device("cuda", rank)} if cuda else {}))
    return cuda


def run(rank, scheme, iters, out_dir, dev="cpu"):
    import torch.distributed as dist

    from autoround_fast.engine import tune_block

    cuda = join_group(rank, out_dir, dev)
    try:
        model, inputs = problem()
        share = SAMPLES // RANKS
        mine = inputs[rank * share:(rank + 1) * share]
        block = copy.deepcopy(model.model.layers[0])
        spec = spec_for(scheme)
        # "cuda-spread": each rank also spreads its Linears over both GPUs (device_ids under
        # torchrun), its own card first: gradients on the other card are reduced via its own
        spread = dict(linear_devices=[f"cuda:{rank}", f"cuda:{1 - rank}"]) if dev == "cuda-spread" else {}
        res = tune_block(block, mine, {n: spec for n in LINEARS}, iters=iters, batch_size=BATCH, seed=SEED,
                         token_mask=torch.ones(share, SEQLEN), backend="cuda" if cuda else "kernels",
                         device=torch.device("cuda", rank) if cuda else None, **spread)
        if spread:
            assert set(res.placement.values()) == {"cuda:0", "cuda:1"}, res.placement
        torch.save(summary(block, res), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_oneshot(rank, out_dir, scheme, n, dev="cpu"):
    """llm-compressor's distributed oneshot on one rank: each rank calibrates on its share of
    the samples and our modifier tunes data-parallel. dev "cpu": gloo and backend "torch";
    "cuda": NCCL, one GPU per rank and backend "cuda" (the torchrun user's setup)."""
    import torch.distributed as dist
    from llmcompressor import oneshot
    from transformers import LlamaForCausalLM

    from autoround_fast import AutoRoundModifier
    from autoround_fast import modifier as modifier_module
    from conftest import tiny_tokenizer
    from test_modifier import calib

    # saved before the group exists (under one, only rank 0 writes); oneshot re-reads the config
    tiny_llama().save_pretrained(f"{out_dir}/model{rank}")
    cuda = join_group(rank, out_dir, dev)
    try:
        model = LlamaForCausalLM.from_pretrained(f"{out_dir}/model{rank}", torch_dtype=torch.bfloat16)
        # Each rank passes its own share, as llm-compressor's get_rank_partition usage does. (Its
        # automatic split of a dataset shared by all ranks is broken in 0.14.0.1: the sampler
        # indexes the rank's slice, the DataLoader the whole dataset, so every rank gets the
        # first share.)
        share = calib(n, SEQLEN, seed=3).select(range(rank * n // RANKS, (rank + 1) * n // RANKS))
        # What each rank's engine produced, taken before the modifier writes it into the model:
        # under a process group compressed-tensors may share the model's storage between ranks.
        results, engine = [], modifier_module.tune_block

        def recording(*args, **kwargs):
            res = engine(*args, **kwargs)
            results.append({name: {k: v.detach().cpu().clone() for k, v in qp.items()}
                            for name, qp in res.qparams.items()})
            return res

        modifier_module.tune_block = recording
        mod = AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=ITERS,
                                batch_size=BATCH, backend="cuda" if cuda else "torch")
        oneshot(model=model, dataset=share, recipe=mod, processor=tiny_tokenizer(),
                num_calibration_samples=len(share), max_seq_length=SEQLEN)
        modifier_module.tune_block = engine
        torch.save(dict(qparams=results, stats=mod.block_stats), f"{out_dir}/oneshot{rank}.pt")
    finally:
        dist.destroy_process_group()
