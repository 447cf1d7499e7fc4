"""formats.py against its C++ twin csrc/formats.h, and against what the compiled ops do."""

import pathlib
import re

import pytest
import torch

from autoround_fast import formats

FORMATS_H = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "formats.h"

# Each C++ constant and its Python twin.
TWINS = {
    "kNvfp4Group": formats.NVFP4_GROUP,
    "kFp4Max": formats.FP4_MAX,
    "kE4m3Max": formats.E4M3_MAX,
    "kIntGroupPerRow": formats.INT_GROUP_PER_ROW,
    "kMxGroup": formats.MX_GROUP,
    "kE8m0ExpMax": formats.E8M0_EXP_MAX,
}
MX_ELEMENT_TWINS = {"kMxFp4": 4, "kMxFp8": 8}  # formats.h's MxElement constants: MX_ELEMENTS[bits]
DTYPE_TWINS = {"kHalf": torch.float16, "kFloat": torch.float32, "kBFloat16": torch.bfloat16}
# FP8 (e4m3)
TWINS |= {"kFp8PerTensor": formats.FP8_PER_TENSOR, "kFp8ScaleMin": formats.FP8_SCALE_MIN, "kFp8Block": formats.FP8_BLOCK}


def _cpp_number(text):
    text = text.strip()
    return float(text.rstrip("f")) if ("." in text or text.endswith("f")) else int(text)


def _formats_h():
    """(constexpr variables, enumerators) of formats.h, as {name: value}."""
    src = FORMATS_H.read_text()
    consts = {name: _cpp_number(value)
              for name, value in re.findall(r"^constexpr\s+(?:int|float|int64_t)\s+(\w+)\s*=\s*([^;]+);", src, re.M)}
    enums = {}
    for body in re.findall(r"^enum\s+\w+\s*:\s*int\s*\{([^}]*)\}", src, re.M):
        for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body):
            enums[name] = int(value)
    return consts, enums


def test_constants_equal_their_cpp_twins():
    consts, _ = _formats_h()
    assert set(consts) == set(TWINS), "a constant of formats.h without a Python twin in formats.py, or gone"
    for name, value in TWINS.items():
        assert consts[name] == value and type(consts[name]) is type(value), name


def test_mx_elements_equal_their_cpp_twins():
    src = FORMATS_H.read_text()
    found = dict(re.findall(r"^constexpr\s+MxElement\s+(\w+)\s*=\s*\{([^}]*)\};", src, re.MULTILINE))
    assert set(found) == set(MX_ELEMENT_TWINS), "an MxElement of formats.h without a twin in MX_ELEMENTS, or gone"
    for name, bits in MX_ELEMENT_TWINS.items():
        ebits, mbits, min_exp, emax, max_norm = (_cpp_number(t) for t in found[name].split(","))
        assert formats.MX_ELEMENTS[bits] == formats.MxElement(ebits, mbits, min_exp, emax, max_norm), name
        assert type(max_norm) is float and all(type(t) is int for t in (ebits, mbits, min_exp, emax)), name


def test_scale_dtype_codes_equal_their_cpp_twins():
    _, enums = _formats_h()
    assert {DTYPE_TWINS[name]: code for name, code in enums.items()} == formats.SCALE_DTYPE_CODES


@pytest.mark.parametrize("dtype", list(formats.SCALE_DTYPE_CODES))
def test_scale_dtype_codes_are_torch_scalar_types(dtype):
    """The op makes its scale tensor of the dtype c10::ScalarType(code) names, through torch's
    own numbering (the C++ side also asserts formats.h's codes equal ScalarType's)."""
    w = torch.randn(4, 64).to(torch.bfloat16)
    ones = torch.ones(4, 2)
    _, scale, _ = torch.ops.autoround_fast.fake_quant_int(w, torch.zeros(4, 64), ones, ones, 4, 32, True,
                                                          formats.SCALE_DTYPE_CODES[dtype])
    assert scale.dtype == dtype


def test_e4m3_max_is_torchs():
    assert formats.E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 32, 100, 128, 129])
def test_group_counts_equal_the_kernels(cols):
    """The groups per row of formats.py are those the C++ ops lay their scales out in
    (formats.h's int_group, kNvfp4Group, kMxGroup and fp8_blocks)."""
    o = torch.ops.autoround_fast
    w = torch.randn(3, cols).to(torch.bfloat16)
    v = torch.zeros(3, cols)
    gs = torch.ones(1)
    _, s = o.fake_quant_nvfp4(w, v, torch.ones(3, formats.nvfp4_num_groups(cols)), gs)
    assert s.shape == (3, formats.nvfp4_num_groups(cols))
    for bits in formats.MX_ELEMENTS:
        _, e = o.fake_quant_mx(w, v, torch.ones(3, formats.mx_num_groups(cols)), bits)
        assert e.shape == (3, formats.mx_num_groups(cols))
    for rows in (3, 128, 129):  # FP8_BLOCK's grid: formats.h's fp8_blocks along each dimension
        grid = formats.fp8_block_grid(rows, cols)
        _, s = o.fake_quant_fp8_block(torch.randn(rows, cols).to(torch.bfloat16), torch.zeros(rows, cols),
                                      torch.ones(grid), formats.SCALE_DTYPE_CODES[torch.float32])
        assert s.shape == grid, (rows, cols)
    for group_size in (formats.INT_GROUP_PER_ROW, 4, 16, 32, 128, 200):
        groups = formats.int_num_groups(cols, group_size)
        ones = torch.ones(3, groups)
        code = formats.SCALE_DTYPE_CODES[torch.float16]
        _, scale, zp = o.fake_quant_int(w, v, ones, ones, 4, group_size, False, code)
        assert scale.shape == zp.shape == (3, groups), (cols, group_size)


@pytest.mark.parametrize("scale_dtype", list(formats.SCALE_DTYPE_CODES))
def test_fp8_scale_floor_is_the_kernels(scale_dtype):
    """An all-zero weight takes the floor: formats.py's FP8_SCALE_MIN as PyTorch rounds it to
    fp32 (the oracle's clip), then to the scale dtype, is the kernels' kFp8ScaleMin."""
    w = torch.zeros(3, 16, dtype=torch.bfloat16)
    code = formats.SCALE_DTYPE_CODES[scale_dtype]
    for ms in (torch.ones(1), torch.ones(3)):
        _, s = torch.ops.autoround_fast.fake_quant_fp8(w, torch.zeros(3, 16), ms, code)
        want = torch.tensor(formats.FP8_SCALE_MIN, dtype=torch.float32).to(scale_dtype).float()
        assert torch.equal(s, want.expand_as(s))
