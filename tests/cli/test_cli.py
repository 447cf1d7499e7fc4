"""The command line on a tiny model: a checkpoint, the per-block table and its JSON; clear
errors; and no half-written output when a run fails."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from autoround_fast.cli import main
from conftest import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    words = " ".join(f"t{int(i)}" for i in torch.randint(1, 256, (600,), generator=g))
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(words)
    return str(p)


def args(model, out, calib, *extra):
    return ["quantize", "--model", model, "--iters", "3", "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", "--backend", "torch", "--calib-file", calib, "--output", str(out),
            "--device", "cpu", *extra]


def test_quantize_writes_checkpoint_table_and_json(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, out, calib_file, "--scheme", "W4A16_ASYM")) == 0
    printed = capsys.readouterr().out
    assert "loss at start" in printed and "model.layers.1" in printed
    report = json.loads((out / "autoround_blocks.json").read_text())
    assert report["scheme"] == "W4A16_ASYM" and report["iters"] == 3 and report["backend"] == "torch"
    assert [b["block"] for b in report["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert all(b["best_loss"] <= b["init_loss"] for b in report["blocks"])
    assert "pack-quantized" in (out / "config.json").read_text()
    assert (out / "tokenizer.json").exists()
    LlamaForCausalLM.from_pretrained(out)  # loads as a compressed-tensors model
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".autoround-fast-")]


def test_dataset_directory(tiny_model_dir, calib_file, tmp_path):
    from datasets import Dataset

    text = open(calib_file).read()
    Dataset.from_dict({"text": [text[:1500], text[1500:]]}).save_to_disk(tmp_path / "ds")
    a = args(tiny_model_dir, tmp_path / "out", calib_file, "--scheme", "W4A16")
    i = a.index("--calib-file")
    a[i:i + 2] = ["--dataset", str(tmp_path / "ds")]
    assert main(a) == 0
    assert json.loads((tmp_path / "out" / "autoround_blocks.json").read_text())["nsamples"] == 4
    with pytest.raises(SystemExit, match="not a directory saved with"):
        main(a[:i] + ["--dataset", "NeelNanda/pile-10k"] + a[i + 2:])
    Dataset.from_dict({"content": ["x"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(SystemExit, match="no 'text' column"):
        main(a[:i] + ["--dataset", str(tmp_path / "bad")] + a[i + 2:])
    with pytest.raises(SystemExit, match="not both"):
        main(a + ["--calib-file", calib_file])


def test_errors_are_clear(tiny_model_dir, calib_file, tmp_path):
    with pytest.raises(SystemExit, match="neither a directory nor a .gguf"):
        main(args(str(tmp_path / "missing"), tmp_path / "o1", calib_file))
    with pytest.raises(SystemExit, match="GGUF file .* not found"):
        main(args(str(tmp_path / "missing.gguf"), tmp_path / "o1", calib_file))
    with pytest.raises(SystemExit, match="--scheme must be one of"):
        main(args(tiny_model_dir, tmp_path / "o1", calib_file, "--scheme", "INT3"))
    with pytest.raises(SystemExit, match="calibration file"):
        main(args(tiny_model_dir, tmp_path / "o1", str(tmp_path / "nope.txt")))
    short = tmp_path / "short.txt"
    short.write_text("t1 t2 t3")
    with pytest.raises(SystemExit, match="fewer than --seqlen 32"):
        main(args(tiny_model_dir, tmp_path / "o1", str(short)))
    with pytest.raises(SystemExit, match="--nsamples must be positive"):
        main(args(tiny_model_dir, tmp_path / "o1", calib_file, "--nsamples", "0"))
    with pytest.raises(ValueError, match="device_ids='0,x': 'x' is not a GPU index"):
        main(args(tiny_model_dir, tmp_path / "o1", calib_file, "--device-ids", "0,x"))
    with pytest.raises(ValueError, match="fuse_elementwise=True needs backend='cuda', got backend='torch'"):
        main(args(tiny_model_dir, tmp_path / "o1", calib_file, "--fuse"))
    assert not (tmp_path / "o1").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(args(tiny_model_dir, busy, calib_file))
    assert os.listdir(busy) == ["keep.txt"]


def test_failed_run_leaves_no_checkpoint(calib_file, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    src = tmp_path / "bad-model"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="up_proj.*non-finite"):
        main(args(str(src), out, calib_file))
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad-model"]


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "autoround_fast", "quantize", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--scheme" in res.stdout and "--calib-file" in res.stdout


def test_settings_are_autoround_defaults_on_a_gpu_and_small_on_a_cpu(capsys):
    """The main job's settings: AutoRound's defaults where there is a GPU, a few-minute setting
    (said so) where there is none; options given on the command line win in both."""
    import argparse

    from autoround_fast import has_cuda_kernels
    from autoround_fast.cli import settings

    none = argparse.Namespace(iters=None, nsamples=None, seqlen=None, batch_size=None, backend="auto")
    gpu = settings(none, cuda=True)
    assert {k: gpu[k] for k in ("iters", "nsamples", "seqlen", "batch_size")} == \
        dict(iters=200, nsamples=128, seqlen=2048, batch_size=8)
    assert gpu["backend"] == ("cuda" if has_cuda_kernels() else "torch")
    assert "no GPU" not in capsys.readouterr().out
    cpu = settings(none, cuda=False)
    assert cpu["iters"] < 200 and cpu["seqlen"] < 2048 and cpu["backend"] == "torch"
    assert "no GPU; using settings that finish in a few minutes" in capsys.readouterr().out
    given = argparse.Namespace(iters=7, nsamples=None, seqlen=64, batch_size=None, backend="torch")
    assert settings(given, cuda=True) == dict(iters=7, nsamples=128, seqlen=64, batch_size=8, backend="torch")
