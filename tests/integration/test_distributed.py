"""Data-parallel tuning over torch.distributed (gloo, 2 processes, CPU): each rank tunes on
its half of the samples, gradients and the loss are reduced every step, and the result equals
the single-process run on all samples whose iterations use the same samples (one micro-batch
per rank's batch, gradient accumulation 2).

Tolerance: exact. With two ranks every reduction is one addition (a + b == b + a in IEEE
arithmetic), the single process accumulates the same two gradients in the same precision, and
the micro-batches have the same shapes, so the same kernels produce the same bits."""

import copy

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker as w
from autoround_fast.engine import tune_block
from autoround_fast.engine.schedule import batch_order


def _spawned(rank, scheme, iters, out_dir, dev):
    w.run(rank, scheme, iters, out_dir, dev)


TWO_GPUS = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2),
                              reason="NCCL across two GPUs needs two GPUs")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=TWO_GPUS),
                                 pytest.param("cuda-spread", marks=TWO_GPUS)])
@pytest.mark.parametrize("scheme,iters", [("nvfp4", w.ITERS), ("w4a16-asym", w.ITERS), ("nvfp4a16", 0)])
def test_two_ranks_equal_one_process(tmp_path, scheme, iters, dev):
    """On two GPUs (NCCL) the single process runs on cuda:0 with the same kernels; NCCL's sum
    of two ranks is the same one addition, so the tolerance stays exact. "cuda-spread": each
    rank's Linears are spread over both GPUs as well (linear_devices), with the same result."""
    mp.spawn(_spawned, args=(scheme, iters, str(tmp_path), dev), nprocs=w.RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(w.RANKS)]

    model, inputs = w.problem()
    share = w.SAMPLES // w.RANKS
    local = batch_order(share, w.BATCH, max(iters, 1), w.SEED)[:iters]
    order = [b + [i + share for i in b] for b in local]  # rank 0's batch, then rank 1's
    block = copy.deepcopy(model.model.layers[0])
    spec = w.spec_for(scheme)
    res = tune_block(block, inputs, {n: spec for n in w.LINEARS}, iters=iters, batch_size=w.BATCH,
                     gradient_accumulate_steps=w.RANKS, token_mask=torch.ones(w.SAMPLES, w.SEQLEN),
                     backend="cuda" if dev != "cpu" else "kernels", batch_order=order if iters else None,
                     device=torch.device("cuda", 0) if dev != "cpu" else None, cuda_graph=False)
    single = w.summary(block, res)

    for r, got in enumerate(ranks):
        assert got["losses"] == single["losses"], r
        assert got["best_iter"] == single["best_iter"], r
        for n in w.LINEARS:
            assert torch.equal(got["weights"][n], single["weights"][n]), (r, n)
            for k, v in single["qparams"][n].items():
                assert torch.equal(got["qparams"][n][k], v), (r, n, k)
        assert torch.equal(got["q_outputs"], single["q_outputs"][r * share:(r + 1) * share]), r
    if iters:
        assert len(set(single["losses"])) > 1
        assert not torch.equal(ranks[0]["q_outputs"], ranks[1]["q_outputs"])  # each rank's own samples


def test_distributed_true_without_a_group_is_an_error():
    model, inputs = w.problem()
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        tune_block(copy.deepcopy(model.model.layers[0]), inputs, {"mlp.down_proj": w.spec_for("nvfp4a16")},
                   iters=1, distributed=True)


def _spawned_oneshot(rank, out_dir, scheme, n, dev):
    w.run_oneshot(rank, out_dir, scheme, n, dev)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
@pytest.mark.parametrize("scheme", ["NVFP4", "W4A16"])
def test_oneshot_under_two_ranks(tmp_path, monkeypatch, scheme, dev):
    """llm-compressor's distributed oneshot (the path torchrun users take): each rank tunes on
    its half of the samples, and the ranks agree
    bit for bit on every block's tuned qparams (the engine's, before they are written into the
    model) and on the (global) losses, which only the
    all-reduces can bring about: the ranks' samples differ. Equality with one process over all
    samples is test_two_ranks_equal_one_process's (engine level, same batches). On "cpu" the
    ranks see no GPU (llm-compressor would put rank r on cuda:r); on "cuda" NCCL and the CUDA
    kernels, one GPU per rank."""
    n = 8
    if dev == "cpu":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the spawned ranks inherit it
    mp.spawn(_spawned_oneshot, args=(str(tmp_path), scheme, n, dev), nprocs=w.RANKS, join=True)
    ranks = [torch.load(tmp_path / f"oneshot{r}.pt", weights_only=False) for r in range(w.RANKS)]
    for r in ranks:
        assert [s["samples"] for s in r["stats"]] == [n // w.RANKS] * 2  # two blocks, half each
    a, b = (r["qparams"] for r in ranks)
    assert len(a) == len(b) == 2 and all(len(block) == 7 for block in a)
    for block_a, block_b in zip(a, b):
        for name, qp in block_a.items():
            for k, v in qp.items():
                assert torch.equal(v, block_b[name][k]), (name, k)
    # the global loss is what both ranks report
    assert [s["losses"] for s in ranks[0]["stats"]] == [s["losses"] for s in ranks[1]["stats"]]
