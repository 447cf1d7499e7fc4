import contextlib

import pytest
import torch

import autoround_fast

HAS_CUDA = torch.cuda.is_available() and autoround_fast.has_cuda_kernels()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU")


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block (its reductions then split no work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer(vocab: int = 256):
    """A word-level tokenizer over the words t0..t{vocab-1}: no hub, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1, vocab)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]")


def tiny_llama(hidden=128, intermediate=256, layers=2, dtype=torch.bfloat16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=layers, vocab_size=256,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init, so blocks move their input
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.08)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama (bf16) with its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def capture_block_inputs(model, layer_idx=0, nsamples=16, seqlen=32, seed=0):
    """(args, kwargs) of one decoder layer per random sample, as llm-compressor captures them."""
    caps = []

    def hook(_m, args, kwargs):
        caps.append((tuple(a.detach() for a in args), dict(kwargs)))

    g = torch.Generator().manual_seed(seed)
    h = model.model.layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for _ in range(nsamples):
                model(torch.randint(1, 256, (1, seqlen), generator=g).to(model.device), use_cache=False)
    finally:
        h.remove()
    return caps
