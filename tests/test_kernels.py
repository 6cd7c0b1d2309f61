"""The CPU decoding kernels (`openowl/infer/kernels.py`, `openowl/infer/cpu_kernels.cpp`): what they compute against
PyTorch's kernels, the same bits for a row alone and in a batch, when each kernel runs, and the fallbacks."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from openowl import OwlForConditionalGeneration
from openowl.config import get_preset
from openowl.infer import kernels
from openowl.infer.generate import forward_step, new_cache, prefill

needs_kernels = pytest.mark.skipif(
    not kernels.cpu_kernels(), reason="the kernels need a CPU with AVX-512 BF16 and a C++ compiler"
)
needs_vnni = pytest.mark.skipif(not kernels.has_avx512_vnni(), reason="the fixed-point int8 path needs AVX-512 VNNI")


def _ops(fn) -> list[str]:
    """The `openowl::` ops that `fn()` ran."""
    with torch.profiler.profile() as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("openowl::")})


def _attention_reference(q, k, v, mask):
    """SDPA in float32, keys and values repeated for grouped heads, in the kernel's (B, 1, H, D) layout."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask).transpose(1, 2)


# --- what they compute ---------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [(50, 64), (48, 160), (7, 32), (2048, 2048)])
def test_small_linear_computes_the_product(n, k):
    """Every row count of one pass (1-8) and of two (9-16), every weight-row tail, against float32."""
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=torch.bfloat16) / k**0.5
    for rows in (*range(1, 10), 16):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        expected = F.linear(x.float(), w.float())
        out = torch.ops.openowl.small_linear(x, w)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        # bf16 output: about 3 significant digits; PyTorch's own bf16 product is held to the same
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(F.linear(x, w).float(), expected, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [(50, 64), (7, 32), (2048, 2048)])
def test_small_linear_int8_computes_the_scaled_product(n, k):
    """Weight-only int8 (`quantize`'s layout): x @ w^T * scale, against float32 and against PyTorch's int8 kernel."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n) / k**0.5 / 50).to(torch.bfloat16)
    for rows in (*range(1, 10), 16):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        expected = F.linear(x.float(), w.float()) * scale.float()
        out = torch.ops.openowl.small_linear_int8(x, w, scale)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(torch._weight_int8pack_mm(x, w, scale).float(), expected, rtol=1e-2, atol=1e-2)


def _int8_exact(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ w^T * scale in float64 (exact for these sizes), rounded once to bf16."""
    return (x.double() @ w.double().T * scale.double()).to(torch.bfloat16)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart each pair is (same-sign finite values)."""
    bits = [t.view(torch.int16).int() for t in (a, b)]
    return (bits[0] - bits[1]).abs()


@needs_kernels
@needs_vnni
def test_int8_fixed_point_rows_give_the_exact_product_rounded_once():
    """Rows whose values all lie within 2^16 of their largest are exact in 24-bit fixed point: every output is the
    exact product rounded to bf16 (at most one step off, where float32 and then bf16 rounding meet), against
    float64. PyTorch's bf16 product of the same values sums in float32 in another order."""
    torch.manual_seed(0)
    n, k = 300, 2048
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # -128 too: the fixed-point path takes any int8
    scale = (torch.rand(n) / 500).to(torch.bfloat16)
    for rows in (1, 2, 3, 5, 8):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        out = torch.ops.openowl.small_linear_int8(x, w, scale)
        exact = _int8_exact(x, w, scale)
        ulps = _bf16_ulps(out, exact)
        assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99


@needs_kernels
@needs_vnni
def test_int8_fixed_point_keeps_small_values_next_to_an_outlier_and_carries_inf_and_nan():
    """A row with one value 10^6 times the others (an activation outlier): the small ones are rounded to 2^-24 of
    the outlier, so the products stay as close to the exact ones as float32's own; a row of zeros gives zeros; rows
    with inf or NaN, and rows too small for a float scale, take the conversion path and match PyTorch's product."""
    torch.manual_seed(0)
    n, k = 64, 256
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.full((n,), 1e-3).to(torch.bfloat16)
    x = torch.randn(4, k, dtype=torch.bfloat16)
    x[0, 7] = 1e6
    x[1] = 0
    x[2, 3] = float("inf")
    x[3, 5] = float("nan")
    out = torch.ops.openowl.small_linear_int8(x, w, scale).float()
    exact = (x[:1].double() @ w.double().T * scale.double()).float()
    torch.testing.assert_close(out[:1], exact, rtol=1e-2, atol=1e-6 * exact.abs().max().item())
    assert torch.equal(out[1], torch.zeros(n))
    reference = F.linear(x[2:].float(), w.float()) * scale.float()
    assert torch.equal(out[2:].isnan(), reference.isnan()) and torch.equal(out[2:].isinf(), reference.isinf())
    tiny = torch.randn(2, k).mul(1e-33).to(torch.bfloat16)  # |x| < 2^-104
    torch.testing.assert_close(
        torch.ops.openowl.small_linear_int8(tiny, w, scale).float(), _int8_exact(tiny, w, scale).float(),
        rtol=1e-2, atol=0,
    )  # fmt: skip


@needs_kernels
@pytest.mark.skipif(not (kernels.has_amx() and kernels.has_avx512_vnni()), reason="AMX-INT8 tiles (an AMX CPU)")
def test_int8_amx_tiles_give_the_bits_of_the_vnni_path(monkeypatch):
    """The fixed-point product on AMX tiles sums the same integers as on AVX-512 VNNI: the same bits for every row
    count, weight rows in blocks of 64 and 32 and a last partial block, and -128 weights."""
    torch.manual_seed(0)
    w = torch.randint(-128, 128, (336, 2048), dtype=torch.int8)
    scale = (torch.rand(336) / 500).to(torch.bfloat16)
    for rows in range(1, 9):
        x = torch.randn(rows, 2048, dtype=torch.bfloat16)
        monkeypatch.setenv("OPENOWL_INT8_AMX_ROWS", "9")  # never
        vnni = torch.ops.openowl.small_linear_int8(x, w, scale)
        monkeypatch.setenv("OPENOWL_INT8_AMX_ROWS", "1")  # always
        assert torch.equal(torch.ops.openowl.small_linear_int8(x, w, scale), vnni)


@needs_kernels
@pytest.mark.parametrize("int8", [False, True])
def test_small_linear_gives_a_row_the_same_bits_alone_and_in_a_batch(int8):
    torch.manual_seed(0)
    if int8:
        op, weights = torch.ops.openowl.small_linear_int8, (torch.randint(-127, 128, (101, 96), dtype=torch.int8),)
        weights += (torch.rand(101).to(torch.bfloat16),)  # the scales
    else:
        op, weights = torch.ops.openowl.small_linear, (torch.randn(101, 96, dtype=torch.bfloat16),)
    for width in (96, 128):  # int8: the conversion path, and the fixed-point one where the CPU has VNNI
        weight = weights[0].repeat(1, 2)[:, :width].contiguous()
        x = torch.randn(8, width, dtype=torch.bfloat16)
        full = op(x, weight, *weights[1:])
        for rows in (1, 3, 5):
            for start in range(8 - rows + 1):
                alone = op(x[start : start + rows].contiguous(), weight, *weights[1:])
                assert torch.equal(alone, full[start : start + rows])


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 64), (4, 2, 32), (8, 1, 128)])
def test_decode_attention_computes_sdpa(heads, kv_heads, dim):
    """Keys and values as views of a longer cache buffer, grouped heads, a left-padded row, a fully masked row."""
    torch.manual_seed(0)
    batch, length = 3, 13
    q = torch.randn(batch, heads, 1, dim, dtype=torch.bfloat16)
    buffers = [torch.randn(batch, kv_heads, 20, dim, dtype=torch.bfloat16) for _ in range(2)]
    k, v = (b[:, :, :length] for b in buffers)  # strided, as the KV cache hands them over
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :4] = False
    scale = dim**-0.5
    for m in (mask, None, mask[:1]):
        out = torch.ops.openowl.decode_attention(q, k, v, m, scale)
        assert out.shape == (batch, 1, heads, dim)
        torch.testing.assert_close(out.float(), _attention_reference(q, k, v, m), rtol=1e-2, atol=1e-2)
    mask[2] = False  # no key at all: zeros, not NaN
    assert torch.equal(torch.ops.openowl.decode_attention(q, k, v, mask, scale)[2], torch.zeros(1, heads, dim))


@needs_kernels
def test_decode_attention_gives_a_row_the_same_bits_alone_and_in_a_padded_batch():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 9, 64, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False  # row 1 is left-padded by 3
    both = torch.ops.openowl.decode_attention(q, k, v, mask, 0.125)
    alone = torch.ops.openowl.decode_attention(q[1:], k[1:, :, 3:], v[1:, :, 3:], None, 0.125)
    assert torch.equal(both[1:], alone)


# --- when each runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("amx", [True, False])
@torch.no_grad()  # as the engine decodes
def test_one_row_products_without_the_kernels_run_as_torch_mv(monkeypatch, amx):
    """Where the kernels don't apply, one-row products run as `torch.mv`, through oneDNN only where the CPU has AMX,
    and give `F.linear`'s result; other shapes are `F.linear`'s own."""
    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: False)
    onednn_during_mv = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: (onednn_during_mv.append(torch.backends.mkldnn.enabled), mv(*a))[1])
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    plain = copy.deepcopy(layer)
    assert kernels.use_decode_kernels(layer) == 1 and type(layer) is kernels.DecodeLinear
    assert layer.state_dict().keys() == plain.state_dict().keys()
    for shape, one_row in (((1, 1, 64), True), ((64,), True), ((2, 3, 64), False)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        out, expected = layer(x), plain(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)  # bf16, other summation order
        assert len(onednn_during_mv) == one_row
        if one_row:
            assert onednn_during_mv.pop() is amx
        assert torch.backends.mkldnn.enabled  # switched back on
    assert kernels.use_stock_kernels(layer) == 1 and type(layer) is torch.nn.Linear


@needs_kernels
@pytest.mark.parametrize("amx", [True, False])
def test_decode_linear_runs_the_kernel_for_up_to_eight_bf16_rows_or_four_with_amx(monkeypatch, amx):
    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    plain = copy.deepcopy(layer)
    kernels.use_decode_kernels(layer)
    shapes = (((1, 1, 64), True), ((4, 1, 64), True), ((8, 1, 64), not amx), ((3, 3, 64), False), ((2, 64), True))
    for shape, kernel in shapes:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.no_grad():  # as the engine decodes
            assert _ops(lambda x=x: layer(x)) == (["openowl::small_linear"] if kernel else [])
            torch.testing.assert_close(layer(x).float(), plain(x).float(), rtol=2e-2, atol=2e-2)  # with the bias
    x = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)  # the kernel has no backward: PyTorch's runs
    assert _ops(lambda: layer(x).sum().backward()) == [] and x.grad is not None
    odd = torch.nn.Linear(40, 8, dtype=torch.bfloat16)  # an inner size that isn't a multiple of 32
    half = torch.nn.Linear(64, 8, dtype=torch.float16)
    for layer in (odd, half):
        kernels.use_decode_kernels(layer)
        layer.requires_grad_(False)
        assert _ops(lambda layer=layer: layer(torch.randn(1, layer.in_features, dtype=layer.weight.dtype))) == []


@needs_kernels
@torch.no_grad()
def test_int8_linear_runs_the_kernel_for_up_to_eight_bf16_rows():
    from openowl.infer.quantize import Int8WeightOnlyLinear

    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    layer = Int8WeightOnlyLinear(weight, (torch.rand(48) / 100).to(torch.bfloat16), torch.randn(48).bfloat16())
    for rows, kernel in ((1, True), (8, True), (9, False), (40, False)):
        x = torch.randn(rows, 1, 64, dtype=torch.bfloat16)
        assert _ops(lambda x=x: layer(x)) == (["openowl::small_linear_int8"] if kernel else [])
        expected = torch._weight_int8pack_mm(x.reshape(rows, 64), weight, layer.scale).view(rows, 1, 48) + layer.bias
        torch.testing.assert_close(layer(x).float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_kernels_fall_back_when_they_cannot_be_built(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "has_amx", lambda: False)
    monkeypatch.setattr(kernels, "has_avx512_bf16", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    try:
        kernels.cpu_kernels.cache_clear()
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernels.cpu_kernels() is False
        assert "could not be built" in caplog.text and "no C++ compiler found" in caplog.text
        kernels.cpu_kernels.cache_clear()
        monkeypatch.setenv("OPENOWL_CPU_KERNELS", "0")
        assert kernels.cpu_kernels() is False
    finally:
        kernels.cpu_kernels.cache_clear()  # the next caller builds (or finds) the real ones


# --- in a model ----------------------------------------------------------------------------------


@needs_kernels
def test_decoding_with_the_kernels_is_as_close_to_float32_as_pytorchs_bf16():
    """A LLaMA with kernel-sized heads (32) and grouped keys, in bf16: a left-padded batch decoded with the kernels
    (both of them running) against each row's full float32 forward, next to the same decode on PyTorch's kernels."""
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.text_config.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    reference = OwlForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in reference.language_model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    prompts = [[1, 450, 4799, 338, 7254, 29889, 306, 1074], [1, 15043, 29991]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    continuation = torch.tensor([[1576, 3186, 13, 8015], [263, 1243, 29901, 2]])

    def decode() -> torch.Tensor:
        with torch.no_grad():
            cache = new_cache(model)
            logits, mask = prefill(model, ids, attention_mask, cache)
            steps = [logits]
            for t in range(continuation.shape[1]):
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
                steps.append(forward_step(model, model.embed_text(continuation[:, t : t + 1]), mask, cache))
        return torch.stack(steps, dim=1).float()

    stock = decode()
    assert kernels.use_decode_kernels(model.language_model) == 7 * 2 + 1
    assert model.language_model.config._attn_implementation == kernels.ATTENTION
    ours = []
    assert _ops(lambda: ours.append(decode())) == ["openowl::decode_attention", "openowl::small_linear"]
    for row, prompt in enumerate(prompts):
        full_ids = torch.tensor([prompt + continuation[row].tolist()])
        with torch.no_grad():
            wanted = reference(inputs_embeds=reference.embed_inputs(full_ids)).logits[0, len(prompt) - 1 :]
        stock_error = (stock[row] - wanted).abs().max()
        assert (ours[0][row] - wanted).abs().max() <= 1.5 * stock_error + 1e-3
    assert kernels.use_stock_kernels(model.language_model) == 7 * 2 + 1
    assert model.language_model.config._attn_implementation == "sdpa"


# --- packed weights ------------------------------------------------------------------------------

needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN's bf16 GEMM needs a CPU with AVX-512",
)


@needs_onednn_bf16
@torch.no_grad()
def test_packed_weights_give_the_linear_result_and_go_once_the_weight_changes():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False))
    block = block.to(torch.bfloat16)
    plain = copy.deepcopy(block)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    assert kernels.pack_weights(block) == 2 and all(type(m) is kernels.PackedLinear for m in block[::2])
    assert block.state_dict().keys() == state.keys()
    for rows in (1, 7, 257):
        x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
        assert _profiled(lambda x=x: block(x)).count("mkldnn::_linear_pointwise") == 2
        torch.testing.assert_close(block(x), plain(x), rtol=1e-2, atol=1e-2)  # the same GEMM, laid out once
    block[0].weight.mul_(2)  # changed in place (as `load_state_dict` does): the packed copy is stale
    plain[0].weight.mul_(2)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert _profiled(lambda: block(x)).count("mkldnn::_linear_pointwise") == 1  # the second layer's only
    torch.testing.assert_close(block(x), plain(x), rtol=1e-2, atol=1e-2)
    assert "_packed" not in block[0].__dict__
    copied = copy.deepcopy(block)  # oneDNN's packed tensor can't be copied: the copy packs its own weight
    assert "_packed" not in copied[0].__dict__ and "_packed" in copied[2].__dict__
    assert copied[2].__dict__["_packed"][2] is not block[2].__dict__["_packed"][2]
    assert torch.equal(copied(x), block(x))
    assert kernels.unpack_weights(block) == 1 and all(type(m) is torch.nn.Linear for m in block[::2])


@needs_onednn_bf16
def test_packing_leaves_fused_parts_other_dtypes_inference_tensors_and_autograd_alone():
    from openowl.infer.fuse import fuse_projections

    torch.manual_seed(0)
    model = OwlForConditionalGeneration(get_preset("tiny")).to(torch.bfloat16).eval()
    lm = model.language_model
    fuse_projections(lm)
    layers = lm.config.num_hidden_layers
    assert kernels.pack_weights(lm) == 4 * layers + 1  # q/k/v, o, gate/up, down and the head; not the parts
    assert kernels.pack_weights(torch.nn.Linear(8, 8)) == 0  # float32
    with torch.inference_mode():  # no version counter to tell a changed weight by
        made_in_inference_mode = torch.nn.Linear(64, 8, dtype=torch.bfloat16)
    assert kernels.pack_weights(made_in_inference_mode) == 0
    layer = torch.nn.Linear(64, 8, dtype=torch.bfloat16)
    kernels.pack_weights(layer)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    assert "mkldnn::_linear_pointwise" not in _profiled(lambda: layer(x).sum().backward())  # no backward: PyTorch's
    assert x.grad is not None


def _profiled(fn) -> list[str]:
    """The names of the ops `fn()` ran, one per call."""
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events()]
