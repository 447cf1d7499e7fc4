"""Resume after a crash (autoround_fast.resume through the modifier's resume_dir): a run that
finds some blocks finished by an earlier run of the same settings reloads them, tunes the
rest, and ends with the weights of an uninterrupted run, bit for bit; a directory made by
other settings or other data is refused before any block is tuned."""

import os

import pytest
import torch
from transformers import LlamaForCausalLM

from autoround_fast import AutoRoundModifier, resume
from autoround_fast.engine import precision
from autoround_fast.resume import ResumeMismatch
from conftest import one_thread, tiny_tokenizer
from test_modifier import calib, quantized_linears, run

from llmcompressor import oneshot


def tuned(model_dir, resume_dir, scheme="W4A16", iters=10):
    """The quantized Linears' parameters (dtype included) and the block rows of one run."""
    mod = AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=iters, batch_size=4,
                            backend="torch", resume_dir=str(resume_dir))
    model = run(model_dir, mod)
    state = {f"{n}.{p}": t.detach().clone() for n, m in quantized_linears(model).items()
             for p, t in m.named_parameters(recurse=False)}
    return state, mod.block_stats


def same_tuning(a, b):
    """The same blocks with the same losses (the times differ where a block was tuned again)."""
    return [(r["block"], r["losses"]) for r in a] == [(r["block"], r["losses"]) for r in b]


@pytest.mark.parametrize("scheme,bf16", [("W4A16", True), ("NVFP4", True), ("W4A16", False)])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(tiny_model_dir, tmp_path, scheme, bf16, monkeypatch):
    """Without AVX512-BF16 a CPU tunes the bf16 model's blocks in fp32 and leaves them so
    (docs/numerics.md#autocast): a reloaded block is converted likewise."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16)
    whole, stats = tuned(tiny_model_dir, tmp_path / "a", scheme)
    assert whole["model.layers.0.self_attn.q_proj.weight"].dtype == (torch.bfloat16 if bf16 else torch.float32)
    # every block's parameters; the quantized output of the last block only
    assert sorted(os.listdir(tmp_path / "a")) == ["model.layers.0.safetensors", "model.layers.1.q_outputs",
                                                  "model.layers.1.safetensors", "run.json"]
    # a crash while the second block tunes
    from autoround_fast import modifier

    real, calls, dies_at = modifier.tune_block, [], [2]

    def counted(*a, **kw):
        calls.append(1)
        if len(calls) in dies_at:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(modifier, "tune_block", counted)
    with pytest.raises(KeyboardInterrupt):
        tuned(tiny_model_dir, tmp_path / "b", scheme)
    assert sorted(os.listdir(tmp_path / "b")) == ["model.layers.0.q_outputs", "model.layers.0.safetensors", "run.json"]
    calls.clear(), dies_at.clear()
    resumed, stats2 = tuned(tiny_model_dir, tmp_path / "b", scheme)
    assert len(calls) == 1  # block 0 reloaded, block 1 tuned
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), scheme
    assert all(resumed[k].dtype == whole[k].dtype for k in whole)
    assert same_tuning(stats2, stats)
    # every block finished: nothing is tuned, the same weights
    calls.clear()
    again, stats3 = tuned(tiny_model_dir, tmp_path / "b", scheme)
    assert all(torch.equal(again[k], whole[k]) for k in whole) and stats3 == stats2 and not calls


def test_a_crash_between_a_blocks_two_files_resumes_from_the_one_before(tiny_model_dir, tmp_path, monkeypatch):
    """The process dies after block 1's output is written and before its own file: block 0's
    output is still there (it is removed only after block 1's file), so block 0 is reloaded
    and block 1 tuned again, to the uninterrupted weights."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    whole, _ = tuned(tiny_model_dir, tmp_path / "whole")
    real = resume._write_atomic

    def dies_at_block_1(path, write):
        if path.endswith("model.layers.1.safetensors"):
            raise OSError("killed")
        real(path, write)

    monkeypatch.setattr(resume, "_write_atomic", dies_at_block_1)
    with pytest.raises(OSError, match="killed"):
        tuned(tiny_model_dir, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["model.layers.0.q_outputs", "model.layers.0.safetensors",
                                                  "model.layers.1.q_outputs", "run.json"]
    monkeypatch.setattr(resume, "_write_atomic", real)
    resumed, stats = tuned(tiny_model_dir, tmp_path / "a")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_directory_of_other_settings_or_data_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    tuned(tiny_model_dir, tmp_path / "a", iters=2)
    with pytest.raises(ResumeMismatch, match=r"holds blocks made with iters=2, this run has iters=3; delete it "):
        tuned(tiny_model_dir, tmp_path / "a", iters=3)
    mod = AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=2, batch_size=4,
                            backend="torch", resume_dir=str(tmp_path / "a"))
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    with pytest.raises(ResumeMismatch, match="made from other calibration inputs"):
        oneshot(model=model, dataset=calib(12, seed=1), recipe=mod, processor=tiny_tokenizer(),
                num_calibration_samples=12, max_seq_length=32)


def test_resume_needs_our_backends_and_one_process(monkeypatch):
    with pytest.raises(ValueError, match="resume_dir needs backend 'torch' or 'cuda'"):
        AutoRoundModifier(scheme="W4A16", targets="Linear", resume_dir="x").on_initialize(None)
    from autoround_fast import modifier

    monkeypatch.setattr(modifier, "process_group", lambda: object())  # as under torchrun with 2 ranks
    with pytest.raises(ValueError, match="resume_dir does not resume data-parallel runs"):
        AutoRoundModifier(scheme="W4A16", targets="Linear", backend="torch", resume_dir="x").on_initialize(None)


def test_the_input_checksum_is_exact_and_order_free():
    x = [torch.randn(1, 16, 64, dtype=torch.bfloat16) for _ in range(3)]
    one = resume.input_checksum(x)
    with one_thread():
        assert resume.input_checksum(x) == one
    y = [t.clone() for t in x]
    y[1][0, 3, 5] = y[1][0, 3, 5].nextafter(torch.tensor(10.0, dtype=torch.bfloat16))  # one ulp
    assert resume.input_checksum(y) != one
    z = [x[0], x[2], x[1]]  # the same samples in another order
    assert resume.input_checksum(z) == one  # sums over samples: the order of samples is the run's business
