"""Data-parallel tuning of one block on N GPUs: time per block and scaling efficiency.

Run once per GPU count, then merge:

    torchrun --nproc-per-node 1 -m bench.dist --out results/
    torchrun --nproc-per-node 2 -m bench.dist --out results/
    python -m bench.dist --report results/

Every rank builds the same random Llama block (8B shape by default), takes its share of the
calibration samples (random tokens through the embedding, seeded, so the union over ranks is
the same set for any N), and tunes with backend "cuda" (NCCL; "gloo" and the CPU kernels
without a GPU). The global batch stays --global-batch samples per iteration (each rank
takes global / N), so a run on N GPUs does the same work as one on one GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch


def run(args) -> None:
    import torch.distributed as dist

    from autoround_fast.engine import tune_block
    from bench.block import capture_layer_inputs, engine_spec
    from bench.shapes import SHAPES, build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        # The communicator's set-up (once per process; 0.4 s in one run, 3.6 s in another on
        # the same kind of host) is not the block's: one collective before the clock starts.
        dist.all_reduce(torch.zeros(1, device=device))
        dist.barrier()
        if args.global_batch % world:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} ranks")
        model = build_model(args.shape, 1, args.seqlen)
        vocab = SHAPES[args.shape].vocab
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (args.nsamples, args.seqlen), generator=g)
        share = ids.tensor_split(world)[rank]
        inputs = capture_layer_inputs(model, share)
        block = model.model.layers[0]
        spec = engine_spec(args.scheme)
        names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        res = tune_block(block, inputs, {n: spec for n in names}, iters=args.iters,
                         batch_size=args.global_batch // world, backend="cuda" if cuda else "kernels")
        row = dict(world=world, scheme=args.scheme, shape=args.shape, nsamples=args.nsamples,
                   seqlen=args.seqlen, iters=args.iters, global_batch=args.global_batch,
                   seconds=res.seconds, phases=res.phases, init_loss=res.init_loss,
                   best_loss=res.best_loss, best_iter=res.best_iter,
                   card=torch.cuda.get_device_name() if cuda else "cpu")
        seconds = torch.tensor([res.seconds], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the block is done when the last rank is
        row["seconds"] = float(seconds)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"dist-{args.scheme}-{world}.json"), "w") as f:
                json.dump(row, f, indent=1)
            print(json.dumps(row), flush=True)
    finally:
        dist.destroy_process_group()


def report(folder: str) -> str:
    rows = sorted((json.load(open(p)) for p in glob.glob(os.path.join(folder, "dist-*.json"))),
                  key=lambda r: (r["scheme"], r["world"]))
    # the engine's global loss sums the ranks' batch means: divide by the ranks to compare
    lines = ["| scheme | GPUs | s/block | tune s | best loss (batch mean) | speed-up | scaling efficiency |",
             "|---|---|---|---|---|---|---|"]
    base = {r["scheme"]: r["seconds"] for r in rows if r["world"] == 1}
    for r in rows:
        b = base.get(r["scheme"])
        speed = f"{b / r['seconds']:.2f}x" if b else ""
        eff = f"{b / (r['seconds'] * r['world']):.0%}" if b else ""
        lines.append(f"| {r['scheme']} | {r['world']} | {r['seconds']:.2f} | {r['phases'].get('tune', 0):.2f} "
                     f"| {r['best_loss'] / r['world']:.5g} | {speed} | {eff} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheme", default="NVFP4", choices=["NVFP4", "W4A16"])
    p.add_argument("--shape", default="8b")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--global-batch", dest="global_batch", type=int, default=8)
    p.add_argument("--out", default="bench-dist-out")
    p.add_argument("--report", help="merge the JSON files of a results folder into a table")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
    else:
        run(args)


if __name__ == "__main__":
    main()
