"""The command line: the main job on a tiny model (checkpoint, per-block table, perplexity of
the original model, of RTN and of the reloaded checkpoint), the checks that fail before any
weight is read, Ctrl-C, options from the environment, and the eval command."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from autoround_fast.cli import CliError, build_parser, main, models, quantize, schemes, texts
from autoround_fast.perplexity import perplexity
from conftest import tiny_llama, tiny_tokenizer

TIMED_REPORTS = ("autoround_blocks.json", "autoround_blocks.svg")  # they hold the seconds each block took
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def words(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"t{int(i)}" for i in torch.randint(1, 256, (n,), generator=g))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(words(600, 1))
    return str(p)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(words(600, 2))
    return str(p)


def args(model, out, calib, *extra):
    return ["quantize", "--model", model, "--iters", "3", "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", "--backend", "torch", "--calib-file", calib, "--output", str(out),
            "--device", "cpu", "--no-eval", *extra]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the checks under test must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model's weights were loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def fails(argv, capsys) -> str:
    """main(argv) returns 2 with one line on stderr; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoround-fast: ") and err.count("\n") == 1, err
    return err


def test_quantize_writes_checkpoint_tables_and_json(tiny_model_dir, calib_file, eval_file, tmp_path, capsys):
    """The main job: checkpoint, per-block table, and the perplexity table (original, RTN, the
    reloaded checkpoint) printed and saved; eval on the checkpoint gives the table's figure."""
    out = tmp_path / "out"
    a = args(tiny_model_dir, out, calib_file, "--scheme", "W4A16_ASYM", "--eval", "--eval-file", eval_file,
             "--eval-windows", "2")
    assert main(a) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "loss at start" in printed and "model.layers.1" in printed
    assert "AutoRound block 2/2 (model.layers.1)" in captured.err  # one bar over the whole model
    svg = (out / "autoround_blocks.svg").read_text()
    assert svg.startswith("<svg") and svg.count('class="seconds"') == 2 and svg.count('class="best_loss"') == 2
    report = json.loads((out / "autoround_blocks.json").read_text())
    assert report["scheme"] == "W4A16_ASYM" and report["iters"] == 3 and report["backend"] == "torch"
    assert report["group_size"] == 128 and report["seed"] == 42
    assert [b["block"] for b in report["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert all(b["best_loss"] <= b["init_loss"] for b in report["blocks"])
    ppl = report["perplexity"]
    assert (ppl["windows"], ppl["seqlen"], ppl["text"]) == (2, 256, eval_file)
    assert [r["role"] for r in ppl["rows"]] == ["original", "rtn", "result"]
    assert "QuantizationModifier" in ppl["rows"][1]["model"] and "reloaded" in ppl["rows"][2]["model"]
    for r in ppl["rows"]:
        assert f"{r['perplexity']:.4f}" in printed
    assert "pack-quantized" in (out / "config.json").read_text()
    assert (out / "tokenizer.json").exists()
    LlamaForCausalLM.from_pretrained(out)  # loads as a compressed-tensors model
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left

    assert main(["eval", str(out), "--text", eval_file, "--eval-windows", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{ppl['rows'][2]['perplexity']:.4f}" in printed and "2 windows of 256 tokens" in printed


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = tiny_llama(dtype=torch.float32)
    windows = torch.randint(1, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]  # mean over 39 tokens each
    assert perplexity(model, windows) == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)
    assert model.training  # left as it was


def test_held_out_text_is_disjoint_from_calibration():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    held = [k for k in topics if texts.is_held_out(k)]
    assert 0 < len(held) < len(topics) // 5
    calib, held_text = texts.pydoc_topics_text(held_out=False), texts.pydoc_topics_text(held_out=True)
    assert len(held_text) > 4 * texts.EVAL_WINDOWS * texts.EVAL_SEQLEN  # ~4 characters a token
    for k in held:
        assert topics[k] in held_text and topics[k] not in calib


def test_dataset_directory(tiny_model_dir, calib_file, tmp_path, capsys):
    from datasets import Dataset

    text = open(calib_file).read()
    Dataset.from_dict({"text": [text[:1500], text[1500:]]}).save_to_disk(tmp_path / "ds")
    a = args(tiny_model_dir, tmp_path / "out", calib_file, "--scheme", "W4A16")
    i = a.index("--calib-file")
    a[i:i + 2] = ["--dataset", str(tmp_path / "ds")]
    assert main(a) == 0
    assert json.loads((tmp_path / "out" / "autoround_blocks.json").read_text())["nsamples"] == 4
    capsys.readouterr()
    a.append("--overwrite")
    assert "not a directory saved with" in fails(a[:i] + ["--dataset", "NeelNanda/pile-10k"] + a[i + 2:], capsys)
    Dataset.from_dict({"content": ["x"]}).save_to_disk(tmp_path / "bad")
    capsys.readouterr()  # save_to_disk's progress bar
    assert "no 'text' column" in fails(a[:i] + ["--dataset", str(tmp_path / "bad")] + a[i + 2:], capsys)
    assert "not both" in fails(a + ["--calib-file", calib_file], capsys)


def test_bad_arguments_fail_in_one_line_before_any_weight_is_read(tiny_model_dir, calib_file, tmp_path, capsys,
                                                                  no_weights, monkeypatch):
    from autoround_fast import has_cuda_kernels

    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"t1 t2\0\x01\x02" * 100)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("t1 caf\xe9 ".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("t1 t2 t3")
    no_config = tmp_path / "not-a-model"
    no_config.mkdir()
    out = tmp_path / "o1"
    model, cal = tiny_model_dir, calib_file
    cases = [
        (args(str(tmp_path / "missing"), out, cal), "--model .* is neither a directory nor a .gguf"),
        (args(str(tmp_path / "missing.gguf"), out, cal), "--model .*: no such GGUF file"),
        (args(str(no_config), out, cal), "without config.json"),
        (args(model, out, cal, "--scheme", "INT3"), "--scheme 'INT3' is not a scheme backend torch tunes"),
        (args(model, out, cal, "--scheme", "FP8_BLOCK", "--backend", "auto_round"),
         "--scheme FP8_BLOCK: the stock path .backend auto_round. stops: llm-compressor's AutoRoundModifier rejects "
         "block strategies; use --backend cuda or torch"),
        (args(model, out, str(tmp_path / "nope.txt")), "--calib-file .*nope.txt': no such file"),
        (args(model, out, str(binary)), "--calib-file .* is a binary file"),
        (args(model, out, str(latin)), "--calib-file .* is not UTF-8 text"),
        (args(model, out, str(short)), "has 3 tokens, fewer than one window of 32"),
        (args(model, out, cal, "--eval", "--eval-file", str(binary)), "--eval-file .* is a binary file"),
        (args(model, out, cal, "--nsamples", "0"), "--nsamples must be positive, got 0"),
        (args(model, out, cal, "--iters", "-1"), "--iters must be zero or more, got -1"),
        (args(model, out, cal, "--device-ids", "0,x"), "--device-ids '0,x': 'x' is not a GPU index"),
        (args(model, out, cal, "--fuse"), "--fuse needs backend cuda"),
        (args(model, out, cal, "--backend", "cuda"),
         "--backend cuda: this build .* has no CUDA kernels" if not has_cuda_kernels() else "--backend cuda needs a GPU"),
        (args(model, out, cal, "--scheme", "W4A16", "--group-size", "48"),
         "--group-size 48: group 48 does not divide in_features 128, 256 of .*q_proj.*; sizes that divide every "
         "layer: 32, 64, 128"),
        (args(model, out, cal, "--group-size", "32"), "--group-size 32: NVFP4 fixes its group at 16"),
        (args(model, out, cal, "--bogus"), "unrecognized arguments: --bogus"),
    ]
    for argv, message in cases:
        assert re.search(message, fails(argv, capsys)), message
    monkeypatch.setenv("AUTOROUND_FAST_ITERS", "many")
    assert "AUTOROUND_FAST_ITERS='many' is not a valid" in fails(args(model, out, cal), capsys)
    monkeypatch.delenv("AUTOROUND_FAST_ITERS")
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert "exists and is not empty (pass --overwrite" in fails(args(model, busy, cal), capsys)
    assert os.listdir(busy) == ["keep.txt"]


def test_bundled_default_checks_fail_fast_and_w4a16_takes_a_dividing_group(tmp_path, capsys, no_weights):
    """On the bundled SmolLM2 (hidden 576, intermediate 1536), from its config alone: a group of
    128 is refused with the sizes that divide; W4A16 with no --group-size takes 64."""
    out = str(tmp_path / "o")
    err = fails(["quantize", "--scheme", "W4A16", "--group-size", "128", "--output", out], capsys)
    assert "in_features 576 of model.layers.*.self_attn.q_proj" in err and "sizes that divide every layer: 32, 64 " in err
    assert "is a binary file" in fails(["quantize", "--calib-file", sys.executable, "--output", out], capsys)
    assert "not a scheme backend" in fails(["quantize", "--scheme", "W4A17", "--output", out], capsys)
    in_features = models.target_in_features(models.load_config(models.bundled_gguf()), schemes.TARGETS, schemes.IGNORE)
    assert set(in_features.values()) == {576, 1536}
    choice = schemes.choose_scheme("W4A16", None, in_features)
    assert choice.group_size == 64 and choice.ignore == ["lm_head"] and choice.label == "W4A16, group 64"
    assert "W4A16's group 128 does not divide in_features 576" in choice.notes[0] and "using group 64" in choice.notes[0]
    err = fails(["quantize", "--scheme", "FP8_BLOCK", "--output", out], capsys)  # 128 x 128 blocks
    assert "--scheme FP8_BLOCK: its group 128 does not divide in_features 576 of model.layers.*.self_attn.q_proj" in err
    choice = schemes.choose_scheme("FP8_BLOCK", None, in_features, skip_indivisible=True)
    assert sorted(set(choice.ignore) - {"lm_head"}) == sorted(n for n, f in in_features.items() if f == 576)
    assert not os.path.exists(out)


def test_bad_argument_exits_2_without_traceback_in_a_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "autoround_fast", "quantize", "--model", str(tmp_path / "none"),
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"autoround-fast: --model '{tmp_path / 'none'}' is neither a directory "
                                               "nor a .gguf file (this command reads no hub: download the model first)"]
    assert "No accelerator available" not in res.stdout + res.stderr


def test_w4a16_out_of_the_box_and_skip_indivisible(calib_file, tmp_path, capsys):
    """A model whose hidden size (192) the W4A16 preset's group 128 does not divide: group 64 by
    default; with --skip-indivisible, group 128 and the layers it does not divide left out."""
    model = tiny_llama(hidden=192, intermediate=384)
    src = tmp_path / "model-192"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert main(args(str(src), tmp_path / "auto", calib_file, "--scheme", "W4A16", "--iters", "1")) == 0
    assert "using group 64" in capsys.readouterr().out
    qc = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64

    assert main(args(str(src), tmp_path / "skip", calib_file, "--scheme", "W4A16", "--iters", "1",
                     "--skip-indivisible")) == 0
    printed = capsys.readouterr().out
    assert re.search(r"warning: group 128 does not divide in_features 192; leaving 12 of 14 layers unquantized "
                     r"\(--skip-indivisible\): model\.layers\.\*\.self_attn\.q_proj \(2 layers\)", printed)
    qc = json.loads((tmp_path / "skip" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert "model.layers.0.mlp.up_proj" in qc["ignore"] and "model.layers.0.mlp.down_proj" not in qc["ignore"]


def test_the_float_presets_reach_every_backend(tiny_model_dir, calib_file, tmp_path, no_weights):
    for name in ("FP8", "FP8_DYNAMIC", "MXFP4", "MXFP8", "W8A8", "W4AFP8"):
        assert name in schemes.scheme_names("torch") and name in schemes.scheme_names("auto_round")
    for name in ("NVFP4A16", "MXFP4A16", "MXFP8A16", "FP8_BLOCK"):  # the stock path cannot; ours can
        assert name in schemes.scheme_names("torch") and name not in schemes.scheme_names("auto_round")
        with pytest.raises(schemes.CliError, match=f"--scheme {name}: the stock path .* use --backend cuda or torch"):
            schemes.check_scheme_name(name.lower(), "auto_round")
    a = args(tiny_model_dir, tmp_path / "o", calib_file, "--scheme", "fp8", "--backend", "auto_round")
    job = quantize.prepare(build_parser().parse_args(a))
    assert (job.choice.name, job.backend, job.choice.modifier_kwargs["scheme"]) == ("FP8", "auto_round", "FP8")


def test_seed_and_lr_reach_the_modifier_and_ctrl_c_leaves_nothing(tiny_model_dir, calib_file, tmp_path, capsys,
                                                            monkeypatch):
    seen = {}

    def interrupted(model, tokenizer, recipe, windows, with_data=True):
        seen["recipe"] = recipe
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "_oneshot", interrupted)
    out = tmp_path / "a" / "b" / "out"
    assert main(args(tiny_model_dir, out, calib_file, "--seed", "7", "--lr", "0.03")) == 130
    assert capsys.readouterr().err.endswith("\nautoround-fast: interrupted\n")
    assert (seen["recipe"].seed, seen["recipe"].lr, seen["recipe"].backend) == (7, 0.03, "torch")
    assert os.listdir(tmp_path) == []  # neither the output, its parents, nor the work directory


def test_sigint_exits_130_and_says_no_gpu_once(tiny_model_dir, calib_file, tmp_path):
    """A real Ctrl-C in the middle of tuning, with the iterations from the environment: status
    130, no traceback, nothing left; the CPU run says "no GPU" once and llm-compressor's "No
    accelerator available" never."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "autoround_fast"] + args(tiny_model_dir, out, calib_file)
    argv.remove("--iters"), argv.remove("3")
    # PYTHONFAULTHANDLER: if the run outlives the interrupt, SIGABRT prints where each thread is
    env = dict(os.environ, AUTOROUND_FAST_ITERS="100000", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # the default disposition, as a terminal's foreground job has it (a background job's is ignored)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "AutoRound (torch) on model.layers.0" in line:
            assert "100000 iterations" in line
            proc.send_signal(signal.SIGINT)
            break
    try:
        rest, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        rest, err = proc.communicate()
        pytest.fail("still running 300 s after Ctrl-C; its threads:\n" + err[-6000:])
    printed = "".join(lines) + rest
    assert proc.returncode == 130, printed + err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "autoround-fast: interrupted"
    assert printed.count("no GPU") == 1 and "No accelerator available" not in printed + err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_a_constructor_prints_no_finalizer_traceback(tmp_path):
    """A Ctrl-C that lands inside a progress bar's constructor leaves an object whose finalizer
    fails when the interrupt's frames are freed; the user still reads one line."""
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import sys\n"
        "from autoround_fast.cli import main, quantize\n"
        "class HalfBuilt:\n"
        "    def __del__(self):\n"
        "        self.pos\n"
        "def run(args):\n"
        "    bar = HalfBuilt()\n"
        "    raise KeyboardInterrupt\n"
        "quantize.run = run\n"
        "sys.exit(main(['quantize']))\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 130
    assert res.stderr.strip().splitlines()[-1] == "autoround-fast: interrupted" and "Traceback" not in res.stderr


def test_options_from_the_environment():
    env = {"AUTOROUND_FAST_ITERS": "1", "AUTOROUND_FAST_OVERWRITE": "yes", "AUTOROUND_FAST_EVAL": "0",
           "AUTOROUND_FAST_SCHEME": "W4A16", "AUTOROUND_FAST_BATCH_SIZE": "3", "AUTOROUND_FAST_TEXT": "x.txt"}
    ap = build_parser(env)
    a = ap.parse_args(["quantize"])
    assert (a.iters, a.overwrite, a.eval, a.scheme, a.batch_size, a.seed) == (1, True, False, "W4A16", 3, 42)
    a = ap.parse_args(["quantize", "--iters", "5", "--eval"])  # the command line wins
    assert (a.iters, a.eval) == (5, True)
    assert ap.parse_args(["eval", "dir"]).text == "x.txt"
    for bad, message in [({"AUTOROUND_FAST_ITERS": "many"}, "AUTOROUND_FAST_ITERS='many' is not a valid"),
                         ({"AUTOROUND_FAST_BACKEND": "tpu"}, "AUTOROUND_FAST_BACKEND='tpu': choose one of"),
                         ({"AUTOROUND_FAST_OVERWRITE": "maybe"}, "AUTOROUND_FAST_OVERWRITE='maybe': write one of")]:
        with pytest.raises(CliError, match=message):
            build_parser(bad)
    assert "AUTOROUND_FAST_<OPTION>" in " ".join(build_parser({})._subparsers._group_actions[0]
                                                 .choices["quantize"].format_help().split())


def test_help_lists_the_commands_and_prints_no_device_warning():
    res = subprocess.run([sys.executable, "-m", "autoround_fast", "--help"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0
    for command in ("quantize", "eval", "selfcheck"):
        assert command in res.stdout
    assert "No accelerator" not in res.stdout + res.stderr
    q = build_parser({})._subparsers._group_actions[0].choices["quantize"].format_help()
    for option in ("--group-size", "--seed", "--eval-file", "--skip-indivisible", "--scheme"):
        assert option in q


def test_non_finite_weights_fail_before_calibration(calib_file, tmp_path, capsys):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    src = tmp_path / "bad-model"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    assert main(args(str(src), out, calib_file)) == 2  # found once loaded, before any calibration
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "autoround-fast: --model: the weight of model.layers.1.mlp.up_proj has non-finite values (NaN or Inf)"
    assert sorted(os.listdir(tmp_path)) == ["bad-model"]


def test_sigkill_then_the_same_command_resumes_to_the_same_checkpoint(tiny_model_dir, calib_file, tmp_path):
    """A run killed (SIGKILL) while it tunes the second block keeps the first in a hidden
    resume directory; the same command then reloads it, tunes the rest, and writes the
    checkpoint of an uninterrupted run, byte for byte; the directory is gone after."""
    def argv(out):
        a = [sys.executable, "-m", "autoround_fast"] + args(tiny_model_dir, out, calib_file)
        a[a.index("--iters") + 1] = "40"  # a second block long enough to be killed in
        return a

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    whole = subprocess.run(argv(tmp_path / "whole"), capture_output=True, text=True, env=env, timeout=900)
    assert whole.returncode == 0, whole.stderr
    keep = tmp_path / ".out.resume"
    proc = subprocess.Popen(argv(tmp_path / "out"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (keep / "model.layers.0.safetensors").exists():
        assert proc.poll() is None, "the run ended before its first block was kept"
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    assert not (tmp_path / "out").exists()
    assert set(os.listdir(keep)) - {"checkpoint"} == {"command.json", "model.layers.0.safetensors",
                                                      "model.layers.0.q_outputs", "run.json"}
    again = subprocess.run(argv(tmp_path / "out"), capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 blocks finished by an earlier run of this command" in again.stdout
    assert "model.layers.0: finished by an earlier run" in again.stdout + again.stderr
    assert not keep.exists()
    for name in sorted(os.listdir(tmp_path / "whole")):
        if name not in TIMED_REPORTS:
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_another_command_is_refused_on_a_kept_resume_directory(tiny_model_dir, calib_file, tmp_path, capsys,
                                                               no_weights):
    keep = tmp_path / ".out.resume"
    keep.mkdir()
    a = args(tiny_model_dir, tmp_path / "out", calib_file)
    job = quantize.prepare(build_parser().parse_args(a))
    (keep / "command.json").write_text(json.dumps(dict(job.command, seed=7)))
    assert quantize.prepare(build_parser().parse_args(a)).resumed_blocks == 0  # no block yet: taken over
    (keep / "model.layers.0.safetensors").write_bytes(b"")
    err = fails(a, capsys)
    assert f"{keep} holds the blocks of another command (its seed was 7, this one's is 42)" in err
    (keep / "command.json").write_text("{")  # cut short
    assert "holds finished blocks but no readable record of their command" in fails(a, capsys)


def test_settings_are_autoround_defaults_on_a_gpu_and_small_on_a_cpu():
    import argparse

    none = argparse.Namespace(iters=None, nsamples=None, seqlen=None, batch_size=None, lr=None)
    assert quantize.settings(none, cuda=True) == dict(iters=200, nsamples=128, seqlen=2048, batch_size=8, lr=None)
    cpu = quantize.settings(none, cuda=False)
    assert cpu == quantize.CPU_SETTINGS and cpu["seqlen"] < 2048 and cpu["lr"] < 1 / cpu["iters"]
    given = argparse.Namespace(iters=7, nsamples=None, seqlen=64, batch_size=None, lr=0.1)
    assert quantize.settings(given, cuda=True) == dict(iters=7, nsamples=128, seqlen=64, batch_size=8, lr=0.1)


def test_output_directory_is_ignored_by_git():
    with open(os.path.join(REPO, ".gitignore")) as f:
        assert "autoround-fast-out/" in f.read().split()


def test_same_command_same_checkpoint(tiny_model_dir, calib_file, tmp_path):
    """Two runs of one command write the same bytes, whatever torch's global generator held
    before: oneshot's calibration sampler shuffles with it (a RandomSampler without a
    generator), and the sample order decides the tuning batches."""
    outs = []
    for i, state in enumerate((1, 2)):
        torch.manual_seed(state)  # what the process did before the command, e.g. another run
        out = tmp_path / f"out{i}"
        assert main(args(tiny_model_dir, out, calib_file, "--scheme", "W4A16", "--iters", "8")) == 0
        outs.append(out)
    report = json.loads((outs[0] / "autoround_blocks.json").read_text())
    assert any(b["best_iter"] > 0 for b in report["blocks"])  # tuning moved: the order matters
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir()) and "model.safetensors" in names
    for name in names:
        if name not in TIMED_REPORTS:
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_selfcheck_compares_every_scheme_kernel_with_its_oracle(capsys):
    from autoround_fast.selfcheck import selfcheck

    assert selfcheck() == 0
    out = capsys.readouterr().out
    for name in ("nvfp4", "mxfp4", "mxfp8", "fp8 per channel", "fp8 per block", "w4a16 sym g128", "w4a16 asym g128"):
        assert re.search(rf"cpu\s+{name}\s+kernel == oracle \(weight, dV\): True", out), name
    assert out.rstrip().endswith("OK")


def test_the_activations_between_layers_stay_on_the_gpu_where_a_share_of_its_free_memory_holds_them(
        tiny_model_dir):
    """The pipeline's activations between layers: host memory off a GPU; on the model's GPU
    where twice the hidden states (8 windows x 16 tokens x hidden x 2 bytes) fit
    OFFLOAD_SHARE of its free memory."""
    from autoround_fast.cli import models, quantize

    model = models.load_model(str(tiny_model_dir), torch.bfloat16)
    windows = torch.zeros(8, 16, dtype=torch.long)
    free = int(2 * 8 * 16 * model.config.hidden_size * 2 / quantize.OFFLOAD_SHARE)
    gpu = torch.device("cuda", 1)
    assert quantize.offload_device(model, windows, torch.device("cpu"), 2**40) == "cpu"
    assert quantize.offload_device(model, windows, gpu, free) == "cuda:1"
    assert quantize.offload_device(model, windows, gpu, free - 8) == "cpu"
