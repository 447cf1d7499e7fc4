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
