"""What a GPU enforces and the interpreter does not: CUDA's per-axis grid limits, and autotune keys that hold
every size the prune function reads. Computed on the CPU, without launching at those shapes.

Every launch grid comes from a grid function of the kernel module (row_grid / col_grid for the contrastive
loss and the sampler, fwd_grid / dkdv_grid / fused_bwd_grid for cross-attention); a spy run checks that each
launcher really goes through them, and the limits are asserted at shapes far past them.
"""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

cl = importlib.import_module("r2d2ds.kernels.contrastive_loss.launchers")
ck_mod = importlib.import_module("r2d2ds.kernels.contrastive_loss.triton_kernels")
ca = importlib.import_module("r2d2ds.kernels.cross_attention")

# CUDA: gridDim.x up to 2^31 - 1, gridDim.y and gridDim.z up to 65,535.
CUDA_GRID_LIMITS = (2**31 - 1, 65_535, 65_535)
SMALLEST_BLOCK = 16


def assert_cuda_grid(grid: tuple, what: str) -> None:
    assert 1 <= len(grid) <= 3, f"{what}: {len(grid)}-d grid"
    for axis, (size, cap) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
        assert 1 <= size <= cap, f"{what}: axis {axis} has {size} programs, CUDA allows {cap}"


def contrastive_grids(b: int, n: int, block: int, d: int = 1024) -> dict:
    r = cl.panel_rows(b, n, 2)
    return {"fwd/sampler/dx": cl.row_grid(b, block), "dy": cl.col_grid(n, block),
            "split fwd": cl.split_grid(*cl.split_shape(b, n, 4 * 264)),
            "grad panel": cl.panel_grid(n, r, block, block), "panel dx gemm": cl.gemm_grid(r, d, block, block),
            "panel dy gemm": cl.gemm_grid(n, d, block, block)}


def cross_attention_grids(B: int, H: int, Lq: int, Lk: int, block: int) -> dict:
    return {"fwd/preprocess/dq": ca.fwd_grid(B, H, Lq, block), "dkdv": ca.dkdv_grid(B, H, Lk, block),
            "fused_bwd": ca.fused_bwd_grid(B, H)}


# Far past the limits of the old layout: 2^22 ITM pairs x 16 heads = 2^26 (batch, head) programs (the old
# axis-1 layout failed from 65,536 = 5,462 pairs x 12 heads); 2^30 contrastive rows (2^26 programs of 16).
@pytest.mark.parametrize("B,H,Lq,Lk", [(3 * 2**20, 16, 257, 64), (2**22, 16, 64, 257),
                                     (1, 1, ca.MAX_LENGTH, ca.MAX_LENGTH)])
def test_cross_attention_grids_within_cuda_limits(B, H, Lq, Lk):
    for block in (SMALLEST_BLOCK, 32, 64, 128):
        for name, grid in cross_attention_grids(B, H, Lq, Lk, block).items():
            assert_cuda_grid(grid, f"cross_attention {name} B={B} H={H} Lq={Lq} Lk={Lk} block={block}")


@pytest.mark.parametrize("b,n", [(2**30, 2**30), (1, 2**31 - 1), (2**30, 1), (65_537 * 16, 65_537 * 16)])
def test_contrastive_grids_within_cuda_limits(b, n):
    for block in (SMALLEST_BLOCK, 64, 128, 256):
        for name, grid in contrastive_grids(b, n, block).items():
            assert_cuda_grid(grid, f"contrastive {name} b={b} n={n} block={block}")


def test_launcher_refuses_lengths_past_the_axis_1_limit():
    q = torch.empty(1, 1, ca.MAX_LENGTH + 1, 16)
    with pytest.raises(AssertionError, match="sequence length"):
        ca._check_launch(q, q, q, None)


def test_grid_check_rejects_the_old_cross_attention_layout():
    """The old layout (query blocks on axis 0, B*H on axis 1) fails the check at 1,821 ITM pairs x 12 heads."""
    B, H, Lq = 3 * 1821, 12, 64
    with pytest.raises(AssertionError, match="axis 1"):
        assert_cuda_grid((triton.cdiv(Lq, 64), B * H), "old layout")


def _spy(monkeypatch, module, names):
    calls = {name: 0 for name in names}
    for name in names:
        real = getattr(module, name)

        def wrapped(*args, _real=real, _name=name):
            calls[_name] += 1
            grid = _real(*args)
            assert_cuda_grid(grid, _name)
            return grid

        monkeypatch.setattr(module, name, wrapped)
    return calls


def test_every_launcher_takes_its_grid_from_the_grid_functions(monkeypatch):
    """Run each launcher once at a tiny size with the grid functions spied on: every kernel's grid is one the
    limit tests above check (a launcher computing its own grid would leave its function uncalled)."""
    cl_calls = _spy(monkeypatch, cl, ["row_grid", "col_grid", "panel_grid", "gemm_grid", "split_grid"])
    ca_calls = _spy(monkeypatch, ca, ["fwd_grid", "dkdv_grid", "fused_bwd_grid"])
    gen = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = (torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=1).to(dev).requires_grad_()
            for _ in range(2))
    from r2d2ds.kernels import contrastive_loss, sample_hard_negatives

    contrastive_loss(x, y, 10.0, impl="triton").backward()  # split forward (both directions), panel backward
    sample_hard_negatives(x.detach(), y.detach(), 10.0, impl="triton", seed=0)
    assert cl_calls["split_grid"] == 3 and cl_calls["panel_grid"] == 1 and cl_calls["gemm_grid"] == 2, cl_calls
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_FWD", "rows")  # the previous kernels
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_BWD", "tiles")
    contrastive_loss(x, y, 10.0, impl="triton").backward()
    sample_hard_negatives(x.detach(), y.detach(), 10.0, impl="triton", seed=0)
    assert cl_calls["row_grid"] == 5 and cl_calls["col_grid"] == 1, cl_calls
    q = torch.randn(2, 2, 9, 16, generator=gen).to(dev).requires_grad_()
    k, v = (torch.randn(2, 2, 12, 16, generator=gen).to(dev).requires_grad_() for _ in range(2))
    ca.cross_attention(q, k, v, impl="triton").sum().backward()  # fused backward
    assert ca_calls["fwd_grid"] == 1 and ca_calls["fused_bwd_grid"] == 1, ca_calls
    q_long = torch.randn(2, 2, 150, 16, generator=gen).to(dev).requires_grad_()
    ca.cross_attention(q_long, k, v, impl="triton").sum().backward()  # key-fused backward
    assert ca_calls["fwd_grid"] == 2 and ca_calls["fused_bwd_grid"] == 2, ca_calls
    monkeypatch.setattr(ca, "_FUSED_BWD_MAX_TILE", 0)
    ca.cross_attention(q, k, v, impl="triton").sum().backward()  # split backward: preprocess, dk/dv, dq
    assert ca_calls["fwd_grid"] == 5 and ca_calls["dkdv_grid"] == 1, ca_calls


# ----------------------------------------------------------------------------------------------------------
# Autotune keys: the prune's result may depend only on the key (and the argument dtypes, which Triton's
# autotuner adds to every key); otherwise the first call's tile list would serve every later size.
# ----------------------------------------------------------------------------------------------------------


def _full_configs(tiles, names):
    return [triton.Config(dict(zip(names, t[: len(names)])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


def _kernels_with_tiles():
    cl._triton()
    ck = ca._triton_kernels()
    cl_cfg = _full_configs(ck_mod._TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    pairs = ("BLOCK_M", "BLOCK_N")
    return [("contrastive fwd", ck_mod._fwd_kernel, cl_cfg), ("contrastive bwd dx", ck_mod._bwd_dx_kernel, cl_cfg),
            ("contrastive bwd dy", ck_mod._bwd_dy_kernel, cl_cfg),
            ("contrastive grad panel", ck_mod._grad_panel_kernel, cl_cfg),
            ("contrastive split fwd", ck_mod._fwd_split_kernel, cl_cfg),
            ("contrastive panel gemm", ck_mod._panel_matmul_kernel,
             _full_configs(ck_mod._GEMM_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))),
            ("cross_attention fwd", ck.fwd, _full_configs(ca._FWD_TILES, pairs)),
            ("cross_attention dkdv", ck.dkdv, _full_configs(ca._DKDV_TILES, pairs)),
            ("cross_attention dq", ck.dq, _full_configs(ca._DQ_TILES, pairs)),
            ("cross_attention fused bwd", ck.fused_bwd, _full_configs(ca._FUSED_BWD_TILES, ("BLOCK_N",))),
            ("cross_attention fused keys bwd", ck.fused_keys_bwd,
             _full_configs(ca._FUSED_KEYS_BWD_TILES, ("BLOCK_M",)))]


SIZES = (1, 7, 33, 64, 300, 4097, 70_000)
# The kernels' integer (size) arguments; the others are tensors or floats, which no prune reads as a size.
INT_ARGS = {"B", "N", "D", "H", "Lq", "Lk", "M", "K", "stride_x", "stride_y", "stride_am", "stride_ak", "stride_bk",
            "stride_bn", "seed", "row_off", "row0", "CHUNKS", "SPLITS", "BLOCK_D", "BLOCK_M", "BLOCK_N"}


@pytest.mark.parametrize("idx", range(11))
def test_autotune_key_holds_every_size_the_prune_reads(idx):
    name, kernel, configs = _kernels_with_tiles()[idx]
    assert kernel.early_config_prune is not None, name
    t = torch.empty(4, 4, dtype=torch.bfloat16)
    # Strides are sizes too (cross-attention passes every operand's four): the prune must not read them either.
    base = {a: (64 if a in INT_ARGS or a.startswith("stride_") else t) for a in kernel.arg_names}
    ints = [a for a in kernel.arg_names if isinstance(base[a], int)]
    prune = lambda args: [str(c) for c in kernel.early_config_prune(configs, args)]
    for arg in ints:
        if arg in kernel.keys:
            continue
        results = {tuple(prune({**base, arg: v})) for v in SIZES}
        assert len(results) == 1, f"{name}: the prune reads {arg!r} but the autotune key {kernel.keys} lacks it"
    # and the check can fail: the key sizes do change the prune's result
    varied = [a for a in kernel.keys if a in ints]
    assert any(len({tuple(prune({**base, a: v})) for v in SIZES}) > 1 for a in varied), name


def test_key_check_catches_a_missing_size(monkeypatch):
    """Drop B from the forward kernel's key: the check above must fail."""
    cl._triton()
    monkeypatch.setattr(ck_mod._fwd_kernel, "keys", [k for k in ck_mod._fwd_kernel.keys if k != "B"])
    with pytest.raises(AssertionError, match="'B'"):
        test_autotune_key_holds_every_size_the_prune_reads(0)


def test_kernel_tests_run_one_config_per_kernel():
    """R2D2DS_AUTOTUNE=0 (tests/kernels/conftest.py) reaches every autotuned kernel (on CUDA: one compile each)."""
    import os

    assert os.environ.get("R2D2DS_AUTOTUNE") == "0"
    for name, kernel, _ in _kernels_with_tiles():
        assert len(kernel.configs) == 1, f"{name}: {len(kernel.configs)} configs despite R2D2DS_AUTOTUNE=0"
    assert len(ck_mod._configs()) == 1
