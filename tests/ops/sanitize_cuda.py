"""Runs every CUDA kernel once on its vector and scalar paths, for compute-sanitizer:

    compute-sanitizer --tool memcheck python tests/ops/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/ops/sanitize_cuda.py
"""

import torch

from autoround_fast import ops


def bests(*ts):
    return [torch.zeros_like(t) for t in ts]


def flag(value):
    return torch.tensor([value], device="cuda")


def fp8_kernels():
    """FP8: the per-tensor passes (16-byte and scalar paths, several tiles), the per-row forward
    with the row in registers (1, 2, 4, 8 chunks a thread) or read twice (ragged, > 16384
    columns), the per-row backward's summing warp (a ragged last group of rows)."""
    for rows, cols in ((33, 128), (33, 70), (3, 2100), (2, 4100), (2, 9000), (2, 16400), (19, 8), (5, 1)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(rows, cols, device="cuda", dtype=dtype)
            v = torch.zeros(rows, cols, device="cuda", requires_grad=True)
            for groups, amax in ((1, None), (1, ops.fp8_weight_amax(w)), (rows, None)):
                ms = torch.ones(groups, 1, device="cuda", requires_grad=True)
                q, _ = ops.fake_quant_fp8(w, v, ms, torch.bfloat16, amax)
                q.float().sum().backward()
            x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
            ms = torch.ones(1, device="cuda", requires_grad=True)
            ops.fake_quant_fp8_activation(x, x.detach().abs().amax().float(), ms).float().sum().backward()


def mx_kernels():
    """MX: weights and activations, MXFP4 and MXFP8, on whole groups (16-byte path) and ragged
    rows (scalar path), with groups sharing a warp in several lane layouts."""
    for rows, cols in ((33, 128), (33, 70), (3, 4096), (19, 8), (5, 1)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for bits in (4, 8):
                w = torch.randn(rows, cols, device="cuda", dtype=dtype)
                v = torch.zeros(rows, cols, device="cuda", requires_grad=True)
                ms = torch.ones(rows, (cols + 31) // 32, device="cuda", requires_grad=True)
                ops.fake_quant_mx(w, v, ms, bits)[0].float().sum().backward()
                x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
                ops.fake_quant_mx_activation(x, bits).float().sum().backward()


def fp8_block_kernels():
    """FP8 in 128 x 128 blocks: whole and partial blocks on the 16-byte path (cols a multiple of
    8) and the scalar path (ragged rows), and a weight smaller than one block."""
    for rows, cols in ((256, 384), (200, 136), (130, 70), (5, 7)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(rows, cols, device="cuda", dtype=dtype)
            v = torch.zeros(rows, cols, device="cuda", requires_grad=True)
            ms = torch.ones(ops.fp8_block_grid(rows, cols), device="cuda", requires_grad=True)
            q, _ = ops.fake_quant_fp8_block(w, v, ms, torch.bfloat16)
            q.float().sum().backward()


def no_token_activations():
    """Every activation op on zero rows (an MoE expert routed no token): nothing launched but
    FP8's finishing reduction, which writes a zero max_scale gradient."""
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(0, 64, device="cuda", dtype=dtype, requires_grad=True)
        gs = torch.ones(1, device="cuda")
        ms = torch.ones(1, device="cuda", requires_grad=True)
        ops.fake_quant_nvfp4_activation(x, gs).float().sum().backward()
        ops.silu_mul_nvfp4_activation(x, x, gs).float().sum().backward()
        for bits in (4, 8):
            ops.fake_quant_mx_activation(x, bits).float().sum().backward()
        ops.fake_quant_fp8_activation(x, torch.ones(1, device="cuda"), ms).float().sum().backward()
        assert ms.grad.item() == 0.0


def main():
    torch.manual_seed(0)
    fp8_kernels()
    mx_kernels()
    fp8_block_kernels()
    no_token_activations()
    lr = torch.full((1,), 0.01, device="cuda")
    for cols in (128, 70):  # whole groups (16-byte path) and ragged rows (scalar path)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(33, cols, device="cuda", dtype=dtype)
            v = torch.zeros(33, cols, device="cuda", requires_grad=True)
            ms = torch.ones(33, (cols + 15) // 16, device="cuda", requires_grad=True)
            # a global scale for the tensor, and one per row (experts stacked by rows)
            for gs in (ops.nvfp4_global_scale(w), torch.rand(33, device="cuda") + 0.5):
                q, _ = ops.fake_quant_nvfp4(w, v, ms, gs)
                q.float().sum().backward()
                for improved in (True, False):  # the backward that steps v and max_scale in place
                    q, _ = ops.step_in_backward_nvfp4(w, v, ms, gs, bests(ms), flag(improved), lr, lambda: None)
                    q.float().sum().backward()
            for group in (-1, 32, 48):  # a row per group, a group per 4 lanes, a warp per group
                groups = ops.int_num_groups(cols, group)
                for sym in (True, False):
                    mn = torch.ones(33, groups, device="cuda", requires_grad=True)
                    mx = torch.ones(33, groups, device="cuda", requires_grad=True)
                    q, _, _ = ops.fake_quant_int(w, v, mn, mx, 4, group, sym)
                    q.float().sum().backward()
                    q, _, _ = ops.step_in_backward_int(w, v, mn, mx, 4, group, sym, torch.float16,
                                                       bests(mn, mx), flag(sym), lr, lambda: None)
                    q.float().sum().backward()
            x = torch.randn(3, 5, cols, device="cuda", dtype=dtype, requires_grad=True)
            y = ops.fake_quant_nvfp4_activation(x, ops.nvfp4_global_scale(x))
            loss = ops.masked_mse_loss(y, torch.randn_like(y), torch.ones(15, device="cuda"))
            loss.backward()
            gate, up = (torch.randn(3, 5, cols, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            ops.silu_mul_nvfp4_activation(gate, up, ops.nvfp4_global_scale(up)).float().sum().backward()
    # the small-group INT forward's grid holds at most the resident blocks, and each warp loops:
    # 1024 x 2048 in groups of 128 (16384 groups) goes round that loop on any card up to 200 SMs
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros(1024, 2048, device="cuda", requires_grad=True)
    mn, mx = (torch.ones(1024, 16, device="cuda", requires_grad=True) for _ in range(2))
    q, _, _ = ops.fake_quant_int(w, v, mn, mx, 4, 128, True)
    q.float().sum().backward()
    q, _, _ = ops.step_in_backward_int(w, v, mn, mx, 4, 128, True, torch.float16, bests(mn, mx), flag(True),
                                       lr, lambda: None)
    q.float().sum().backward()
    for n, offset in ((4096, 0), (1001, 1)):  # the step's 16-byte and scalar paths
        buf = [torch.randn(n + offset, device="cuda")[offset:] for _ in range(3)]
        for improved in (True, False):
            ops.copy_if_(buf[1], buf[2], torch.tensor([improved], device="cuda"))  # 16-byte and byte paths
            for best in (buf[1], None):  # with a best copy, and without (V's)
                ops.sign_step_(buf[0], best, buf[2], torch.tensor([improved], device="cuda"),
                               torch.full((1,), 0.01, device="cuda"))
    torch.cuda.synchronize()
    print("sanitize_cuda: all kernels ran")


if __name__ == "__main__":
    main()
