"""Resume after a crash (autoround_fast.resume through the modifier's resume_dir): a run that
finds some blocks finished by an earlier run of the same settings reloads them, tunes the
rest, and ends with the weights of an uninterrupted run, bit for bit; a directory made by
other settings or other data is refused before any block is tuned."""

import os

import pytest
import torch

from autoround_fast import AutoRoundModifier
from autoround_fast.engine import precision
from autoround_fast.resume import ResumeMismatch
from test_modifier import calib, quantized_linears, run

from llmcompressor import oneshot  # noqa: F401  (imported before the modifier runs, as in test_modifier)


def tuned(model_dir, resume_dir, scheme="W4A16", iters=10):
    mod = AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=iters, batch_size=4,
                            backend="torch", resume_dir=str(resume_dir))
    model = run(model_dir, mod)
    state = {f"{n}.{p}": t.detach().clone() for n, m in quantized_linears(model).items()
             for p, t in m.named_parameters(recurse=False)}
    return state, mod.block_stats


def same_tuning(a, b):
    """The same blocks with the same losses (the times differ where a block was tuned again)."""
    return [(r["block"], r["losses"]) for r in a] == [(r["block"], r["losses"]) for r in b]


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4"])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(tiny_model_dir, tmp_path, scheme):
    whole, stats = tuned(tiny_model_dir, tmp_path / "a", scheme)
    assert sorted(os.listdir(tmp_path / "a")) == ["model.layers.0.safetensors", "model.layers.1.safetensors",
                                                  "run.json"]
    # a crash after the first block: the second block's file never got written
    (tmp_path / "a" / "model.layers.1.safetensors").unlink()
    resumed, stats2 = tuned(tiny_model_dir, tmp_path / "a", scheme)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), scheme
    assert stats2[0] == stats[0] and same_tuning(stats2, stats)  # the first block's row from its file
    # every block finished: nothing is tuned, the same weights
    again, stats3 = tuned(tiny_model_dir, tmp_path / "a", scheme)
    assert all(torch.equal(again[k], whole[k]) for k in whole) and stats3 == stats2


def test_a_directory_of_other_settings_or_data_is_refused(tiny_model_dir, tmp_path):
    tuned(tiny_model_dir, tmp_path / "a", iters=2)
    with pytest.raises(ResumeMismatch, match=r"made with iters=2, this run has iters=3; delete it to start over"):
        tuned(tiny_model_dir, tmp_path / "a", iters=3)
    mod = AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=2, batch_size=4,
                            backend="torch", resume_dir=str(tmp_path / "a"))
    from llmcompressor import oneshot
    from transformers import LlamaForCausalLM
    from conftest import tiny_tokenizer

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    with pytest.raises(ResumeMismatch, match="made from other calibration inputs"):
        oneshot(model=model, dataset=calib(12, seed=1), recipe=mod, processor=tiny_tokenizer(),
                num_calibration_samples=12, max_seq_length=32)


def test_resume_needs_our_backends():
    with pytest.raises(ValueError, match="resume_dir needs backend 'torch' or 'cuda'"):
        AutoRoundModifier(scheme="W4A16", targets="Linear", resume_dir="x").on_initialize(None)
