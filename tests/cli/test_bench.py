"""The benchmarks run end to end on a CPU at toy sizes, so that a broken bench is found here
and not in a device call: bench.block with both backends (auto-round's curve comes from its
own loss function) and bench.dist under torchrun with two gloo ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_module(args, tmp_path, launcher=(sys.executable, "-m")):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([*launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_block_bench_rows_and_curves(tmp_path):
    iters, layers = 4, 2
    out = run_module(["bench.block", "--shape", "tiny", "--layers", str(layers), "--backends", "auto_round",
                      "torch", "--no-compile", "--iters", str(iters), "--nsamples", "4", "--seqlen", "16",
                      "--batch-size", "2", "--scheme", "NVFP4", "W4A16-G64", "--out", "res"], tmp_path)
    results = json.loads((tmp_path / "res" / "block.json").read_text())["results"]
    assert sorted((r["scheme"], r["backend"]) for r in results) == [
        ("NVFP4", "auto_round"), ("NVFP4", "torch"), ("W4A16-G64", "auto_round"), ("W4A16-G64", "torch")]
    for r in results:
        assert len(r["block_s"]) == layers and all(s > 0 for s in r["block_s"])
        assert [len(c) for c in r["curves"]] == [iters] * layers, r["backend"]
        for curve, best, at in zip(r["curves"], r["best_loss"], r["best_iter"]):
            assert best == curve[at] == min(curve)  # the best is the lowest scored loss
        if r["backend"] == "torch":
            assert len(r["phases"]) == layers and "tune" in r["phases"][0]
    table = (tmp_path / "res" / "block.md").read_text()
    assert table.count("x |") == 2  # a speed-up for each scheme's torch row
    assert "| W4A16-G64 | torch |" in out


def test_dist_bench_two_gloo_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not beside this python")
    args = ["bench.dist", "--shape", "tiny", "--nsamples", "8", "--seqlen", "16", "--iters", "3",
            "--scheme", "W4A16", "--out", "res"]
    for n in (1, 2):
        run_module(args, tmp_path, launcher=(str(torchrun), "--nproc-per-node", str(n), "-m"))
    rows = {json.loads(p.read_text())["world"]: json.loads(p.read_text()) for p in (tmp_path / "res").glob("*.json")}
    assert sorted(rows) == [1, 2] and all(r["iters"] == 3 and r["seconds"] > 0 for r in rows.values())
    table = run_module(["bench.dist", "--report", "res"], tmp_path)
    assert "| W4A16 | 1 |" in table and "| W4A16 | 2 |" in table and "100%" in table


def _toy_accuracy(tmp_path, *args) -> dict:
    """bench.accuracy on the bundled SmolLM2 at toy sizes (skipped without it), calibrated and
    evaluated on different halves of Python's own help; its accuracy.json."""
    from autoround_fast.cli.models import bundled_gguf

    try:
        bundled_gguf()
    except SystemExit as e:
        pytest.skip(str(e))
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    (tmp_path / "calib.txt").write_text("\n\n".join(topics[k] for k in keys[: len(keys) // 2]))
    (tmp_path / "eval.txt").write_text("\n\n".join(topics[k] for k in keys[len(keys) // 2:])[:6000])
    run_module(["bench.accuracy", "--calib", "calib.txt", "--eval", "eval.txt", "--scheme", "W4A16-G64",
                "--nsamples", "2", "--seqlen", "32", "--batch-size", "2", "--eval-seqlen", "256", "--out", "res",
                *args], tmp_path)
    return json.loads((tmp_path / "res" / "accuracy.json").read_text())


def test_accuracy_bench_on_smollm2(tmp_path):
    """bench.accuracy on the real SmolLM2 at toy sizes: the bf16, RTN and engine rows come out
    finite, quantizing costs perplexity, every quantized row's checkpoint is saved and
    reloaded, and the engine's scores exactly what the tuned in-memory model scored."""
    rows = _toy_accuracy(tmp_path, "--rows", "rtn", "torch:2")["rows"]
    by = {r["method"]: r for r in rows}
    assert sorted(by) == ["bf16", "rtn", "torch"], by
    assert all(r["ppl"] == r["ppl"] and 1 < r["ppl"] < 1e4 for r in rows)
    assert min(r["ppl"] for r in rows if r["method"] != "bf16") > by["bf16"]["ppl"]
    assert by["torch"]["reload_equal"] and by["torch"]["ppl_reloaded"] == by["torch"]["ppl"]
    assert "reload_error" not in by["rtn"] and 1 < by["rtn"]["ppl_reloaded"] < 1e4
    assert "ppl_reloaded" not in by["bf16"]


def test_accuracy_bench_quantizes_the_first_layers_only(tmp_path):
    """bench.accuracy --layers N: the engine tunes N decoder layers, and the ignore patterns
    leave exactly the later ones unquantized, as compressed-tensors matches module names."""
    import torch.nn as nn
    from compressed_tensors.utils import match_named_modules

    sys.path.insert(0, str(ROOT))
    from bench.accuracy import later_layers

    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(2, 2)}) for _ in range(12))
    kept = [n for n, _ in match_named_modules(model, ["Linear"], later_layers(2, 12))]
    assert kept == ["layers.0.proj", "layers.1.proj"]
    assert later_layers(None, 12) == []
    with pytest.raises(SystemExit, match="--layers"):
        later_layers(13, 12)
    result = _toy_accuracy(tmp_path, "--rows", "torch:2", "torch:2:7", "--layers", "2", "--no-reload")
    default, seeded = result["rows"][1:]
    assert result["layers"] == 2 and default["blocks"] == seeded["blocks"] == 2
    assert "seed" not in default and seeded["seed"] == 7


def test_accuracy_bench_rows_and_their_modifiers():
    """A row's backend, iterations and seed reach the modifier it runs; a row without a seed
    keeps the modifier's default."""
    sys.path.insert(0, str(ROOT))
    from bench.accuracy import make_recipe, parse_row
    from bench.common import quant_kwargs

    assert parse_row("rtn") == ("rtn", None, None)
    assert parse_row("cuda:200") == ("cuda", 200, None)
    assert parse_row("auto_round:0:3") == ("auto_round", 0, 3)
    kwargs = quant_kwargs("MXFP4")
    assert type(make_recipe(kwargs, *parse_row("rtn"), 8, True)).__name__ == "QuantizationModifier"
    seeded = make_recipe(kwargs, *parse_row("auto_round:0:3"), 8, False)
    assert (seeded.backend, seeded.iters, seeded.seed, seeded.enable_torch_compile) == ("auto_round", 0, 3, False)
    assert make_recipe(kwargs, *parse_row("torch:5"), 4, True).seed == type(seeded)().seed


@pytest.mark.parametrize("row", ["cuda", "gptq:200", "cuda:2x", "torch:1:2:3"])
def test_accuracy_bench_refuses_a_bad_row_before_loading_anything(tmp_path, row):
    sys.path.insert(0, str(ROOT))
    from bench.accuracy import main

    with pytest.raises(SystemExit, match=f"--rows {row}: expected rtn or backend:iters"):
        main(["--calib", str(tmp_path / "none-a.txt"), "--eval", str(tmp_path / "none-b.txt"), "--rows", "rtn", row])


def test_profile_sums_kernels_by_kind():
    """bench.loop_profile's summary: each kernel counted once, under the first kind whose
    name it matches (names as the H100/H200 profiles printed them)."""
    sys.path.insert(0, str(ROOT))
    from bench.loop_profile import kernel_kinds

    rows = [(2.0, 6, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT"),
            (1.5, 1, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26"),
            (1.0, 14, "void autoround_fast::(anonymous namespace)::sign_step_kernel<true>(SignStepArgs)"),
            (0.5, 4, "void autoround_fast::(anonymous namespace)::fake_quant_nvfp4_activation_backward_kernel"),
            (0.375, 1, "void autoround_fast::(anonymous namespace)::silu_mul_act_backward_kernel<autoround_fast::bf16_t, tru"),
            (0.25, 1, "triton_poi_fused_mul_silu_silu_backward_0"),
            (0.125, 2, "void at::native::(anonymous namespace)::indexSelectSmallIndex<long, long>"),
            (0.0625, 4, "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>")]
    kinds = kernel_kinds(rows)
    assert kinds == {"ours": 1.875, "attention": 1.5, "matmul": 2.0, "fused (Triton)": 0.25,
                     "copies and gathers": 0.125, "other element-wise": 0.0625}
    assert sum(kinds.values()) == sum(r[0] for r in rows)


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_memory_bench_counts_the_blocks_linears(shape):
    """bench.memory's estimate, worked out by hand from the shape's dimensions: 12 bytes per
    tuned bf16 weight (V and its gradient, the saved and the best fake-quantized weight; an MoE
    block's experts' fake-quantized weights are made again in the backward, one projection's
    stack at a time: 2 bytes less for all but the largest stack), no cache beyond the two a later block finds held (the reference outputs take the released fp
    inputs' place), and one micro-batch's forward and backward over each Linear's widths (an
    expert's on top_k / E of the tokens); with the caches, two more."""
    sys.path.insert(0, str(ROOT))
    from bench.memory import estimate
    from bench.shapes import SHAPES

    s, n, tokens, batch = SHAPES[shape], 4, 16, 2
    heads_out, kv_out = s.heads * (s.head_dim or s.hidden // s.heads), s.kv_heads * (s.head_dim or s.hidden // s.heads)
    attention = [(s.hidden, heads_out), (s.hidden, kv_out), (s.hidden, kv_out), (heads_out, s.hidden)]
    mlp = [(s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]
    copies, share = (s.experts, s.top_k / s.experts) if s.experts else (1, 1.0)
    weights = sum(i * o for i, o in attention) + copies * sum(i * o for i, o in mlp)
    widths = sum(i + o for i, o in attention) + copies * share * sum(i + o for i, o in mlp) + 4 * s.hidden
    stacks = [s.experts * i * o for i, o in mlp] if s.experts else [0]
    expected = 12 * weights - 2 * (sum(stacks) - max(stacks)) + int(2 * batch * tokens * widths * 2)
    r = estimate(shape, n, tokens, batch)
    assert r["weights"] == weights and r["routed"] == (3 * s.experts if s.experts else 0)
    assert r["adds_gib"] * 2**30 == expected
    assert r["with_caches_gib"] * 2**30 == expected + 2 * n * tokens * s.hidden * 2


def test_model_bench_phases_add_up(tmp_path):
    layers = 3
    out = run_module(["bench.model", "--shape", "tiny", "--layers", str(layers), "--iters", "3", "--nsamples", "4",
                      "--seqlen", "16", "--batch-size", "2", "--stock-layers", "2", "--no-compile",
                      "--extrapolate-to", "12", "--out", "res"], tmp_path)
    r = json.loads((tmp_path / "res" / "model.json").read_text())
    ours, stock = r["ours"], r["stock"]
    assert ours["backend"] == "torch" and ours["offload_device"] == "cpu" and len(ours["block_s"]) == layers
    assert abs(ours["load_s"] + ours["oneshot_s"] + ours["save_s"] - ours["total_s"]) < 1e-9
    assert 0 < ours["tune_s"] < ours["oneshot_s"] and ours["outside_tune_s"] > 0
    assert all(b <= i for b, i in zip(ours["best_loss"], ours["init_loss"]))
    assert len(stock["block_s"]) == 2 and stock["later_block_s"] == stock["block_s"][1]
    assert abs(stock["whole_model_s"] - (stock["block_s"][0] + stock["block_s"][1] * (layers - 1))) < 1e-9
    assert "| **end to end** |" in out and "stock path (auto_round), measured on 2 layers" in out
    assert len(ours["loop_s"]) == layers and abs(sum(ours["loop_s"]) - ours["tune_s"]) < 1e-9
    extra = r["extrapolated"]  # 12 layers: 4x the phases outside the loops, the loops by block
    for phase in ("load_s", "outside_tune_s", "save_s"):
        assert extra[phase] == pytest.approx(4 * ours[phase])
    later = (ours["loop_s"][1] + ours["loop_s"][2]) / 2  # the median of the two later loops
    assert extra["tune_s"] == pytest.approx(ours["loop_s"][0] + later * 11)
    assert extra["total_s"] == pytest.approx(sum(extra[p] for p in ("load_s", "outside_tune_s", "tune_s", "save_s")))
    assert "extrapolated to 12 layers" in out


def test_trace_memory_finds_what_is_live_at_the_highest_total():
    """bench.trace_memory's replay of an allocation trace: the live set at the highest total,
    frees counted only once completed, a free of an allocation from before the trace ignored."""
    sys.path.insert(0, str(ROOT))
    from bench.trace_memory import live_at_peak

    events = [dict(action="alloc", addr=1, size=100), dict(action="alloc", addr=2, size=50),
              dict(action="free_requested", addr=1, size=100), dict(action="alloc", addr=3, size=30),
              dict(action="free_completed", addr=1, size=100), dict(action="free_completed", addr=9, size=70),
              dict(action="alloc", addr=4, size=90), dict(action="alloc", addr=5, size=10)]
    peak, live = live_at_peak(events)
    assert peak == 180 and sorted(live) == [1, 2, 3]
