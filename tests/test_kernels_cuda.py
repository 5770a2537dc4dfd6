"""CUDA/Triton kernels against a self-contained float64 reference of the MLP math (skipped without a GPU)."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from densesparse import kernels as K  # noqa: E402

DEV = "cuda"


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
    """The tiny test layers are far below runtime.SPARSE_MIN_MB: the size rule off, so they run the kernels
    (test_size_rule_runs_small_layers_dense turns it back on)."""
    from densesparse.runtime import SparseMLP
    monkeypatch.setattr(SparseMLP, "size_rule", False)


@pytest.fixture(params=[False, True], ids=["old", "compact"])
def compact(request, monkeypatch):
    """Both Triton decode paths: the old one (tiles in neuron order) and the compacted one (CONFIG["compact"]:
    active blocks listed on the device, full tiles, compacted h, down kernel over the active rows only)."""
    monkeypatch.setitem(K.CONFIG, "compact", request.param)
    return request.param


def no_triton_path(compact, T, most=K.DECODE_MAX_T):
    """The compact variant of a case that never takes the Triton decode path (T above what it runs: DECODE_MAX_T when
    the path is chosen by T, 16 where a test also asks for path="triton") is the old one: skipped."""
    if compact and T > most:
        pytest.skip("no Triton decode path at this T")


# ---------------------------------------------------------------------------------------------------------------
# float64 reference (self-contained)
# ---------------------------------------------------------------------------------------------------------------
def ref_act(v, act):
    if act == "silu":
        return v * torch.sigmoid(v)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(v, approximate="tanh")
    if act == "gelu":
        return torch.nn.functional.gelu(v)
    if act == "relu":
        return torch.relu(v)
    raise ValueError(act)


def ref_route(x, r_w1, r_b1, r_w2, r_b2, t):
    x64 = x.double()
    h1 = x64 @ r_w1.double().T
    if r_b1 is not None:
        h1 = h1 + r_b1.double()
    s = torch.relu(h1) @ r_w2.double().T
    if r_b2 is not None:
        s = s + r_b2.double()
    p = torch.softmax(s, dim=-1)
    ps, idx = p.sort(dim=-1, descending=True)
    before = ps.cumsum(-1) - ps
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask.scatter_(1, idx, before < t)
    return mask, p


def ref_mlp(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, mask, tau, e, n_shared, act, gate_scale=None,
            gate_tau=0.0, counts=False, decide_tau=0.0):
    """counts=True: also the per-token (up rows computed, neurons kept for down) [2, T] the kernels report.
    decide_tau > 0: the gate dial and tau judge gate and up summed over the channels with |x| >= decide_tau only."""
    def gate_up(xs):
        x64 = xs.double()
        u = x64 @ w_up.double().T + (0 if b_up is None else b_up.double())
        g = None if w_gate is None else x64 @ w_gate.double().T + (0 if b_gate is None else b_gate.double())
        return g, u

    g, u = gate_up(x)
    g_dec, u_dec = gate_up(x * (x.abs() >= decide_tau)) if decide_tau > 0 else (g, u)
    if w_gate is not None:
        h = ref_act(g, act) * u
        h_dec = ref_act(g_dec, act) * u_dec
    else:
        h = ref_act(u, act)
        h_dec = ref_act(u_dec, act)
    T, m = h.shape
    S = n_shared * e
    sel = torch.ones((T, m), dtype=torch.bool, device=x.device)
    sel[:, S:] = mask.repeat_interleave(e, dim=1)
    if gate_scale is not None and gate_tau > 0:
        sel = sel & (ref_act(g_dec, act).abs() * gate_scale.double() >= gate_tau)
    up_rows = sel.sum(1)
    if tau is not None:
        sel = sel & (h_dec.abs() >= tau.double())
    h = torch.where(sel, h, torch.zeros((), dtype=h.dtype, device=h.device))
    y = h @ w_down_t.double()
    if b_down is not None:
        y = y + b_down.double()
    return (y, torch.stack([up_rows, sel.sum(1)])) if counts else y


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def capture_graph(fn):
    """fn() once on a side stream (compiles and allocates outside the capture), then captured: (graph, fn's result,
    whose tensors each replay rewrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def make_layer(gen, d, e, n_shared, n_e, dtype, gated=True, biases=False, device=DEV):
    m = n_shared * e + n_e * e

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)

    L = {
        "w_gate": rn(m, d, scale=d ** -0.5) if gated else None,
        "w_up": rn(m, d, scale=d ** -0.5),
        "w_down_t": rn(m, d, scale=m ** -0.5),
        "b_gate": rn(m, scale=0.1) if (biases and gated) else None,
        "b_up": rn(m, scale=0.1) if biases else None,
        "b_down": rn(d, scale=0.1) if biases else None,
        "m": m,
    }
    return L


def poison_allocator(device=DEV):
    """Fill a large freed block with NaN so torch.empty in the kernels likely hands back poisoned memory."""
    if device == "cpu":
        return
    buf = torch.full((1 << 24,), float("nan"), device=device, dtype=torch.float32)
    del buf


def run_case(gen, *, d, e, n_shared, n_e, T, dtype, act="silu", gated=True, biases=False, use_tau=False,
             p_sel=0.4, mask_kind="random", path=None, device=DEV):
    L = make_layer(gen, d, e, n_shared, n_e, dtype, gated, biases, device)
    m = L["m"]
    x = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
    if mask_kind == "random":
        mask = (torch.rand(T, n_e, generator=gen) < p_sel).to(device)
    elif mask_kind == "none":
        mask = torch.zeros(T, n_e, dtype=torch.bool, device=device)
    else:
        mask = torch.ones(T, n_e, dtype=torch.bool, device=device)
    tau = None
    if use_tau:
        tau = (torch.rand(m, generator=gen) * 0.3).to(device=device, dtype=torch.float32)
    ref = ref_mlp(x, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"], mask, tau, e,
                  n_shared, act)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    poison_allocator(device)
    y = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, tau, act, path=path)
    assert y.shape == (T, d) and y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or overflowing output"
    assert torch.count_nonzero(packed["acc"]).item() == 0, "decode workspace not left zeroed"
    assert torch.count_nonzero(packed["cnt"]).item() == 0, "decode counters not left zeroed"
    if ref.norm() == 0:
        assert y.abs().max().item() == 0
        return 0.0
    err = rel_err(y, ref)
    # a second call on the same inputs gives the same answer up to atomic-order rounding (a race would move it)
    y2 = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, tau, act, path=path)
    assert rel_err(y2, y.double()) < 2e-3
    return err


# ---------------------------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("e", [1, 4, 8, 16, 32, 128])
@pytest.mark.parametrize("T", [1, 5, 16, 64])
def test_mlp_matches_reference(e, T, dtype, compact):
    no_triton_path(compact, T, most=16)
    gen = torch.Generator().manual_seed(1000 * e + T + (7 if dtype == torch.float16 else 0))
    n_e = max(6, 1024 // e)
    paths = ["triton", "dense", None] if T <= 16 else ["dense", None]
    for path in paths:
        err = run_case(gen, d=256, e=e, n_shared=1, n_e=n_e, T=T, dtype=dtype, path=path)
        assert err < 1e-2, (path, err)


@pytest.mark.parametrize("T,n_shared,n_e", [(1, 0, 1792), (2, 3, 1792), (1, 0, 7), (2, 0, 14336), (5, 1, 3000),
                                             (16, 2, 1025), (1, 4, 1)])
def test_active_blocks(T, n_shared, n_e):
    """The compacted path's list: [count, shared blocks and the union of the tokens' experts, ascending], for
    fresh random masks of every density (zero and all experts included), chunk boundaries crossed."""
    gen = torch.Generator().manual_seed(T * 7 + n_shared + n_e)
    for p in (0.0, 0.05, 0.25, 0.5, 1.0):
        mask = (torch.rand(T, n_e, generator=gen) < p).to(DEV)
        blk = K.active_blocks(mask, n_shared)
        want = torch.cat([torch.arange(n_shared), n_shared + mask.any(0).nonzero().flatten().cpu()])
        cnt = blk[0].item()
        assert cnt == want.numel(), (p, cnt, want.numel())
        assert torch.equal(blk[1:1 + cnt].cpu().long(), want.long())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_compact_list_and_skip_variants(T, fused, monkeypatch):
    """The compacted path with its block list made by every gate/up program (c_fused) or by the separate kernel,
    and the down kernel with and without the zero-row skip: the reference, zero and all experts, e 1/8/12/48
    (tiles that split and gather blocks), biases, tau, the gate dial."""
    monkeypatch.setitem(K.CONFIG, "compact", True)
    monkeypatch.setitem(K.CONFIG, "c_fused", fused)
    gen = torch.Generator().manual_seed(8000 + T + 10 * int(fused))
    for skip in (False, True):
        monkeypatch.setitem(K.CONFIG, "c_dn_skip", skip)
        for e, n_shared, n_e, kind in ((8, 0, 120, "random"), (1, 3, 301, "random"), (12, 1, 30, "none"),
                                       (48, 1, 5, "all"), (8, 2, 60, "random")):
            err = run_case(gen, d=200, e=e, n_shared=n_shared, n_e=n_e, T=T, dtype=torch.bfloat16, path="triton",
                           mask_kind=kind, biases=True, use_tau=(e == 1))
            assert err < 1e-2, (skip, e, kind, err)
        if T <= 2:
            err, _, _ = gate_case(gen, d=256, e=8, n_shared=1, n_e=60, T=T, dtype=torch.bfloat16, use_tau=True,
                                  biases=True)
            assert err < 1e-2, (skip, err)


@pytest.mark.parametrize("mask_kind", ["none", "all"])
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_mlp_zero_and_all_experts(mask_kind, n_shared, T, compact):
    no_triton_path(compact, T, most=16)
    gen = torch.Generator().manual_seed(17 + T + n_shared)
    paths = ["triton", "dense"] if T <= 16 else ["dense"]
    for path in paths:
        err = run_case(gen, d=320, e=16, n_shared=n_shared, n_e=20, T=T, dtype=torch.bfloat16,
                       mask_kind=mask_kind, biases=True, path=path)
        assert err < 1e-2, (path, err)


@pytest.mark.parametrize("d,e,n_shared,n_e", [(200, 4, 1, 37), (203, 1, 3, 201), (200, 8, 0, 25), (136, 32, 1, 3),
                                               (200, 12, 1, 30), (136, 48, 1, 5)])
@pytest.mark.parametrize("T", [1, 3, 16, 20])
def test_mlp_odd_sizes(d, e, n_shared, n_e, T, compact):
    no_triton_path(compact, T, most=16)
    gen = torch.Generator().manual_seed(d * 31 + e + T)
    paths = ["triton", "dense"] if T <= 16 else ["dense"]
    for path in paths:
        err = run_case(gen, d=d, e=e, n_shared=n_shared, n_e=n_e, T=T, dtype=torch.bfloat16, biases=True,
                       path=path)
        assert err < 1e-2, (path, err)


@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_tanh", True), ("gelu", False), ("relu", False),
                                       ("gelu_tanh", False)])
@pytest.mark.parametrize("T", [2, 24])
def test_mlp_acts_bias_tau(act, gated, T, compact):
    no_triton_path(compact, T, most=16)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{act}-{gated}-{T}".encode()) % 10000)  # str hash is salted
    paths = ["triton", "dense"] if T <= 16 else ["dense"]
    for path in paths:
        for use_tau in (False, True):
            err = run_case(gen, d=384, e=8, n_shared=2, n_e=60, T=T, dtype=torch.float16, act=act, gated=gated,
                           biases=True, use_tau=use_tau, path=path)
            assert err < 1e-2, (act, gated, path, use_tau, err)


# ---------------------------------------------------------------------------------------------------------------
# Gate dial: a selected neuron is kept only where |act(gate)| * gate_scale >= gate_tau
# ---------------------------------------------------------------------------------------------------------------
def realistic_gate_scale(gen, L, d, dtype):
    """As SparseMLP.calibrate_gate_scale: mean |up| over random inputs, times each neuron's down-row norm."""
    xc = torch.randn(256, d, generator=gen).to(DEV, dtype).double()
    u = xc @ L["w_up"].double().T
    if L["b_up"] is not None:
        u = u + L["b_up"].double()
    return (u.abs().mean(0) * L["w_down_t"].double().norm(dim=1)).to(dtype)


def gate_case(gen, *, d, e, n_shared, n_e, T, dtype, mask_kind="random", use_tau=False, biases=False, drop=0.5,
              path="triton", act="silu"):
    """One call with the gate dial on (gate_tau midway between the two scores around the `drop` quantile, so no
    neuron sits on it; drop > 1: nothing kept) against the float64 reference: output, and the per-token counts
    within the tie band of the decisions."""
    L = make_layer(gen, d, e, n_shared, n_e, dtype, True, biases)
    m = L["m"]
    x = torch.randn(T, d, generator=gen).to(DEV, dtype)
    mask = ((torch.rand(T, n_e, generator=gen) < 0.5) if mask_kind == "random"
            else torch.ones(T, n_e, dtype=torch.bool)).to(DEV)
    gs = realistic_gate_scale(gen, L, d, dtype)
    g = x.double() @ L["w_gate"].double().T
    if L["b_gate"] is not None:
        g = g + L["b_gate"].double()
    score = ref_act(g, act).abs() * gs.double()
    srt = score.flatten().sort().values
    k = min(int(drop * srt.numel()), srt.numel() - 1)
    gate_tau = 2 * srt[-1].item() if drop > 1 else (srt[k - 1].item() + srt[k].item()) / 2
    tau = (torch.rand(m, generator=gen) * 0.05).to(DEV, torch.float32) if use_tau else None
    ref, ref_cnt = ref_mlp(x, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"], mask, tau,
                           e, n_shared, act, gate_scale=gs, gate_tau=gate_tau, counts=True)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    counts = torch.zeros(2, T, dtype=torch.int32, device=DEV)
    poison_allocator()
    y = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, tau, act, path=path, gate_scale=gs,
                     gate_tau=gate_tau, counts=counts)
    assert y.shape == (T, d) and y.dtype == dtype and torch.isfinite(y).all()
    assert torch.count_nonzero(packed["acc"]).item() == 0 and torch.count_nonzero(packed["cnt"]).item() == 0
    # decisions this close (relative) to their threshold may go either way: the Triton path accumulates in fp32;
    # the dense-with-mask path takes gate and up from cuBLAS in the input dtype (bf16 rounding: 2^-8)
    band = 1e-3 if path == "triton" else 1e-2
    near = ((score - gate_tau).abs() <= band * gate_tau).sum(1)
    if tau is not None:
        u = x.double() @ L["w_up"].double().T + (0 if L["b_up"] is None else L["b_up"].double())
        hh = (ref_act(g, act) * u).abs()
        near = near + ((hh - tau.double()).abs() <= band * tau.double()).sum(1)
    diff = (counts.long() - ref_cnt.long()).abs()
    assert (diff <= near[None, :]).all(), (counts, ref_cnt, near)
    if drop > 1:
        assert counts.sum().item() == 0
        assert (y.double() - (0 if L["b_down"] is None else L["b_down"].double())).abs().max().item() < 1e-2
        return 0.0, counts, ref_cnt
    kept_up = ref_cnt[0].double() / (n_shared * e + mask.sum(1).double() * e)
    assert (kept_up < 0.9).all(), "the gate dial cut too little for the test to mean anything"
    return rel_err(y, ref), counts, ref_cnt


@pytest.mark.parametrize("two_phase", [True, False])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("e", [1, 4, 8, 16, 32, 128])
def test_gate_dial_matches_reference(e, T, two_phase, compact, monkeypatch):
    """Triton decode path with the gate dial, both gate/up tile variants: alone (every expert on), with an expert
    mask (router), with down tau, with biases, fp16 and bf16, the zero-kept case; counts = the reference's."""
    monkeypatch.setitem(K.CONFIG, "gu_two_phase", two_phase)
    gen = torch.Generator().manual_seed(4000 + 10 * e + T + int(two_phase))
    n_e = max(6, 1024 // e)
    for mask_kind, use_tau, biases, dtype in (("all", False, False, torch.bfloat16),
                                               ("random", False, True, torch.bfloat16),
                                               ("random", True, False, torch.float16),
                                               ("all", True, True, torch.bfloat16)):
        err, _, _ = gate_case(gen, d=256, e=e, n_shared=1, n_e=n_e, T=T, dtype=dtype, mask_kind=mask_kind,
                              use_tau=use_tau, biases=biases)
        assert err < 1e-2, (mask_kind, use_tau, biases, dtype, err)
    for biases in (False, True):
        gate_case(gen, d=256, e=e, n_shared=1, n_e=n_e, T=T, dtype=torch.bfloat16, biases=biases, drop=2.0)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_input_tau_equals_cut_input(T, compact, monkeypatch):
    """sparse_mlp(x, input_tau=t) (the kernels cut x as they load it) is bit-identical to sparse_mlp on x cut by
    torch (x * (|x| >= t), compared in x's dtype), with and without the gate dial and down tau, on both paths."""
    no_triton_path(compact, T)
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    gen = torch.Generator().manual_seed(8700 + T)
    d, e, n_shared, n_e = 320, 8, 1, 60
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, True, True)
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    t = torch.quantile(x.abs().float().flatten(), 0.4).item() + 1e-5  # between bf16 values: the rounding matters
    mask = (torch.rand(T, n_e, generator=gen) < 0.5).to(DEV)
    gs = realistic_gate_scale(gen, L, d, torch.bfloat16)
    tau = (torch.rand(L["m"], generator=gen) * 0.05).to(DEV, torch.float32)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    for kw in ({}, {"gate_scale": gs, "gate_tau": float(gs.float().median())}):
        for tv in (None, tau):
            y_cut = K.sparse_mlp(x * (x.abs() >= t), packed, L["b_gate"], L["b_up"], L["b_down"], mask, tv, "silu",
                                 **kw)
            y_in = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, tv, "silu", input_tau=t, **kw)
            assert torch.equal(y_in, y_cut), (kw.keys(), tv is None)


@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("T,path,two_phase", [(1, "triton", True), (1, "triton", False), (2, "triton", True),
                                              (2, "triton", False), (5, "dense", True)])
def test_early_decisions_match_reference(gated, act, T, path, two_phase, compact, monkeypatch):
    """decide_tau: the gate dial and tau judge partial sums over the channels with |x| >= decide_tau and the kept
    neurons get the full sums over the input-skip channels: both Triton tile variants and the dense-with-mask path
    against the float64 reference (output, and counts within a tie band of 2 per token); the dials cut on the
    partial sums something the full sums would keep; a decide_tau at or below input_tau is the plain call. The
    dense-with-mask case runs in float32: in bf16 its decisions are taken on cuBLAS outputs rounded to 2^-8, which
    flips neurons near the thresholds even without early decisions."""
    if path == "triton":
        no_triton_path(compact, T)
    monkeypatch.setitem(K.CONFIG, "gu_two_phase", two_phase)
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    gen = torch.Generator().manual_seed(9100 + T + 10 * int(gated) + 100 * int(two_phase))
    d, e, n_shared, n_e = 320, 8, 1, 60
    dtype = torch.bfloat16 if path == "triton" else torch.float32
    for biases in (False, True):
        L = make_layer(gen, d, e, n_shared, n_e, dtype, gated, biases)
        x = torch.randn(T, d, generator=gen).to(DEV, dtype)
        srt = x.abs().flatten().sort().values
        in_tau, dec_tau = srt[int(0.2 * srt.numel())].item(), srt[int(0.6 * srt.numel())].item()
        x_in = x * (x.abs() >= in_tau)
        mask = (torch.rand(T, n_e, generator=gen) < 0.6).to(DEV)
        tau = (torch.rand(L["m"], generator=gen) * 0.05).to(DEV, torch.float32)
        kw = {}
        if gated:
            gs = realistic_gate_scale(gen, L, d, dtype)
            g_dec = (x_in * (x.abs() >= dec_tau)).double() @ L["w_gate"].double().T
            score = (ref_act(g_dec + (0 if L["b_gate"] is None else L["b_gate"].double()), act).abs()
                     * gs.double()).flatten().sort().values
            k = score.numel() // 2
            kw = {"gate_scale": gs, "gate_tau": (score[k - 1].item() + score[k].item()) / 2}
        packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
        args = (L["b_gate"], L["b_up"], L["b_down"], mask, tau, act)
        ref, ref_cnt = ref_mlp(x_in, L["w_gate"], L["w_up"], L["w_down_t"], *args[:5], e, n_shared, act, counts=True,
                               decide_tau=dec_tau, **kw)
        _, plain_cnt = ref_mlp(x_in, L["w_gate"], L["w_up"], L["w_down_t"], *args[:5], e, n_shared, act,
                                   counts=True, **kw)
        assert (ref_cnt != plain_cnt).any(), "the partial sums changed no decision: the test means nothing"
        counts = torch.zeros(2, T, dtype=torch.int32, device=DEV)
        poison_allocator()
        y = K.sparse_mlp(x, packed, *args, path=path, counts=counts, input_tau=in_tau, decide_tau=dec_tau, **kw)
        assert y.shape == (T, d) and torch.isfinite(y).all()
        assert rel_err(y, ref) < 1e-2, (biases, rel_err(y, ref))
        assert ((counts.long() - ref_cnt.long()).abs() <= 2).all(), (counts, ref_cnt)
        y_plain = K.sparse_mlp(x, packed, *args, path=path, input_tau=in_tau, **kw)
        y_low = K.sparse_mlp(x, packed, *args, path=path, input_tau=in_tau, decide_tau=in_tau / 2, **kw)
        assert torch.equal(y_low, y_plain)
        if gated:  # the gate dial alone deciding early (no tau)
            ref_g = ref_mlp(x_in, L["w_gate"], L["w_up"], L["w_down_t"], *args[:4], None, e, n_shared, act,
                            decide_tau=dec_tau, **kw)
            y_g = K.sparse_mlp(x, packed, *args[:4], None, act, path=path, input_tau=in_tau, decide_tau=dec_tau, **kw)
            assert rel_err(y_g, ref_g) < 1e-2, (biases, rel_err(y_g, ref_g))
            # tau alone deciding early (no gate dial): it judges act(partial gate) * partial up
            ref_t = ref_mlp(x_in, L["w_gate"], L["w_up"], L["w_down_t"], *args[:5], e, n_shared, act,
                            decide_tau=dec_tau)
            y_t = K.sparse_mlp(x, packed, *args, path=path, input_tau=in_tau, decide_tau=dec_tau)
            assert rel_err(y_t, ref_t) < 1e-2, (biases, rel_err(y_t, ref_t))


@pytest.mark.parametrize("T", [3, 5, 24])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gate_dial_dense_masked_path(T, act):
    """T > DECODE_MAX_T (dense-with-mask): the same gate dial in the fused mask/act kernel, counts included."""
    gen = torch.Generator().manual_seed(5000 + T)
    for use_tau, biases in ((False, False), (True, True)):
        err, _, _ = gate_case(gen, d=320, e=8, n_shared=2, n_e=60, T=T, dtype=torch.bfloat16, use_tau=use_tau,
                              biases=biases, path="dense", act=act)
        assert err < 1e-2, (use_tau, biases, err)
    gate_case(gen, d=320, e=8, n_shared=2, n_e=60, T=T, dtype=torch.bfloat16, path="dense", act=act, drop=2.0)


@pytest.mark.parametrize("two_phase", [True, False])
def test_gate_dial_cuda_graph(two_phase, compact, monkeypatch):
    """Router + gate-dial MLP captured in a CUDA graph: every replay equals the eager call on the same input,
    bit for bit (deterministic down kernel), and the float64 reference on the graph's mask."""
    monkeypatch.setitem(K.CONFIG, "gu_two_phase", two_phase)
    gen = torch.Generator().manual_seed(6)
    d, e, n_shared, n_e, T = 512, 8, 1, 80, 1
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, biases=True)
    gs = realistic_gate_scale(gen, L, d, torch.bfloat16)
    r = 64
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    r_w2 = (torch.randn(n_e, r, generator=gen)).to(DEV, torch.bfloat16)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    x_static = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    gate_tau = 0.05

    def step():
        mk = K.route(x_static, r_w1, None, r_w2, None, 0.5)
        return mk, K.sparse_mlp(x_static, packed, L["b_gate"], L["b_up"], L["b_down"], mk, None, "silu",
                                gate_scale=gs, gate_tau=gate_tau)

    g, (mk_out, y_out) = capture_graph(step)
    for _ in range(3):
        x_static.copy_(torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        mk_e, y_e = step()
        assert torch.equal(mk_e, mk_out) and torch.equal(y_e, y_out)
        ref, cnt = ref_mlp(x_static, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"],
                           mk_out, None, e, n_shared, "silu", gate_scale=gs, gate_tau=gate_tau, counts=True)
        assert rel_err(y_out, ref) < 1e-2
        assert cnt[0].item() < 0.9 * (n_shared * e + mk_out.sum().item() * e)


@pytest.mark.parametrize("e,T", [(16, 4), (8, 1), (8, 2)])
def test_mlp_cuda_graph(e, T, compact):
    """Router + sparse MLP (Triton path) captured once, replayed on new inputs (new masks, so a new active-block
    count on the compact path): the float64 reference on the graph's mask; the replay equals the eager call."""
    no_triton_path(compact, T)
    gen = torch.Generator().manual_seed(5 + e + T)
    d, n_shared, n_e = 512, 1, 640 // e
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, biases=True)
    r = 64
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    r_w2 = (torch.randn(n_e, r, generator=gen)).to(DEV, torch.bfloat16)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    x_static = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)

    def step():
        mk = K.route(x_static, r_w1, None, r_w2, None, 0.5)
        return mk, K.sparse_mlp(x_static, packed, L["b_gate"], L["b_up"], L["b_down"], mk, None, "silu")

    g, (mk_out, y_out) = capture_graph(step)
    for seed in range(3):
        x_static.copy_(torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        ref = ref_mlp(x_static, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"],
                      mk_out, None, e, n_shared, "silu")
        assert rel_err(y_out, ref) < 1e-2
        if T <= K.DECODE_MAX_T:  # the Triton path (deterministic down kernel): bit-identical to eager
            mk_e, y_e = step()
            assert torch.equal(mk_e, mk_out) and torch.equal(y_e, y_out)
        mk_ref, _ = ref_route(x_static, r_w1, None, r_w2, None, 0.5)
        assert (mk_ref != mk_out).float().mean().item() < 0.02


# ---------------------------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------------------------
def check_route(mask, p, ref_mask, t, tol=1e-4):
    """Equal to the reference selection except where the decision sits on a tie (mass before within tol of t)."""
    assert mask.dtype == torch.bool and mask.shape == ref_mask.shape
    diff = mask != ref_mask
    if not diff.any():
        return
    tt, jj = diff.nonzero(as_tuple=True)
    for a, b in zip(tt.tolist(), jj.tolist()):
        row = p[a]
        before = row[row > row[b]].sum().item()
        assert abs(before - t) < tol, f"token {a} expert {b}: mass before {before} vs threshold {t}"
    # at least one expert per token always
    assert mask.any(dim=1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4, 16, 40])
@pytest.mark.parametrize("n_e,r", [(7, 64), (112, 128), (1792, 256), (3000, 96)])
def test_route_matches_reference(T, n_e, r, dtype):
    gen = torch.Generator().manual_seed(T * 7919 + n_e + r)
    d = 512
    x = torch.randn(T, d, generator=gen).to(DEV, dtype)
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, dtype)
    r_b1 = (torch.randn(r, generator=gen) * 0.1).to(DEV, dtype)
    r_w2 = (torch.randn(n_e, r, generator=gen) * 2 * r ** -0.5).to(DEV, dtype)
    r_b2 = (torch.randn(n_e, generator=gen) * 0.1).to(DEV, dtype)
    # T > 16 (prefill) runs the router's first layer on tensor cores with a bf16/fp16 output: looser tie band
    tol = 1e-4 if T <= 16 else 3e-2
    for t in (0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        mask = K.route(x, r_w1, r_b1, r_w2, r_b2, t)
        ref_mask, p = ref_route(x, r_w1, r_b1, r_w2, r_b2, t)
        check_route(mask, p, ref_mask, t, tol)
        if t == 1.0:
            assert mask.all()
    mask = K.route(x, r_w1, None, r_w2, None, 0.5)
    ref_mask, p = ref_route(x, r_w1, None, r_w2, None, 0.5)
    check_route(mask, p, ref_mask, 0.5, tol)


def test_route_peaked_and_flat():
    d, r, n_e, T = 256, 64, 64, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    # flat router: all logits equal -> every expert ties; the rule keeps ceil(t * n_e) of them
    r_w2 = torch.zeros(n_e, r, device=DEV, dtype=torch.bfloat16)
    mask = K.route(x, r_w1, None, r_w2, None, 0.5)
    assert mask.all(), "all-tied experts: each has mass-before 0 under strict ranking, so all are kept"
    # very peaked router: one expert dominates
    r_w2 = torch.zeros(n_e, r, device=DEV, dtype=torch.bfloat16)
    r_b2 = torch.full((n_e,), -30.0, device=DEV, dtype=torch.bfloat16)
    r_b2[5] = 30.0
    mask = K.route(x, r_w1, None, r_w2, r_b2, 0.9)
    assert mask[:, 5].all() and mask.sum().item() == T


@pytest.mark.parametrize("T,n_e", [(17, 1792), (300, 448), (64, 14336), (33, 20000)])
def test_route_large_T_bisect(T, n_e):
    """T > 16: cuBLAS layer 1, tensor-core layer 2, bisection select (n_e > 16384 falls back to pairwise)."""
    gen = torch.Generator().manual_seed(T + n_e)
    d, r = 512, 64
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    r_b1 = (torch.randn(r, generator=gen) * 0.1).to(DEV, torch.bfloat16)
    # scale 2 as in test_route_matches_reference: with very peaked logits the bf16 layer-1 output of the T > 16
    # path can swap two near-tied top experts whose mass exceeds t (a tie outside the band, not a rule error)
    r_w2 = (torch.randn(n_e, r, generator=gen) * 2 * r ** -0.5).to(DEV, torch.bfloat16)
    r_b2 = (torch.randn(n_e, generator=gen) * 0.1).to(DEV, torch.bfloat16)
    for t in (0.3, 0.5, 0.9):
        mask = K.route(x, r_w1, r_b1, r_w2, r_b2, t)
        ref_mask, p = ref_route(x, r_w1, r_b1, r_w2, r_b2, t)
        check_route(mask, p, ref_mask, t, 3e-2)
        frac = (mask != ref_mask).float().mean().item()
        assert frac < 5e-3, frac


def near_tie(p, t, tol):
    """Whether some token's decision at threshold t sits on a tie: an expert whose mass before is within tol of t."""
    for row in p:
        ps = row.sort(descending=True).values
        if ((ps.cumsum(0) - ps - t).abs() < tol).any():
            return True
    return False


@pytest.mark.parametrize("dial", [False, True])
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("e,n_shared,n_e", [(1, 0, 640), (1, 0, 5000), (3, 2, 150), (8, 0, 1792), (8, 2, 60),
                                            (16, 1, 40), (32, 0, 20), (128, 1, 5)])
def test_routed_select_equals_mask_path(e, n_shared, n_e, T, dial):
    """route_logits + sparse_mlp(logits=, threshold=) (the gate/up tiles apply the XMoE rule themselves) gives the
    output of route + sparse_mlp(mask): bit for bit unless a decision sits on a tie (the two kernels sum the
    masses in different orders); and the float64 reference's within 1e-2. Every tile width meets whole and
    partial experts (e 1 to 128, shared blocks before the routed ones), thresholds from 0.05 to 1; the logits in
    one piece (n_e <= 4096) and in chunks (5000)."""
    gen = torch.Generator().manual_seed(e * 1000 + n_e + T + 7 * n_shared + int(dial))
    d, r = 256, 64
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, biases=True)
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    r_b1 = (torch.randn(r, generator=gen) * 0.1).to(DEV, torch.bfloat16)
    r_w2 = (torch.randn(n_e, r, generator=gen) * r ** -0.5).to(DEV, torch.bfloat16)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    gs = torch.rand(L["m"], generator=gen).to(DEV, torch.bfloat16) if dial else None
    tau = (torch.rand(L["m"], generator=gen) * 0.05).to(DEV, torch.float32)
    kw = {"gate_scale": gs, "gate_tau": 0.1 if dial else 0.0, "path": "triton", "compact": False}
    logits = K.route_logits(x, r_w1, r_b1, r_w2, None)
    for t in (0.05, 0.5, 0.9, 1.0):
        mask = K.route(x, r_w1, r_b1, r_w2, None, t)
        y_mask = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, tau, "silu", **kw)
        poison_allocator()
        y = K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], None, tau, "silu", logits=logits,
                         threshold=t, **kw)
        assert torch.isfinite(y).all()
        assert torch.count_nonzero(packed["cnt"]).item() == 0, "decode counters not left zeroed"
        ref_mask, p = ref_route(x, r_w1, r_b1, r_w2, None, t)
        if not torch.equal(y, y_mask):
            assert near_tie(p, t, 1e-5), (t, rel_err(y, y_mask.double()))
        else:
            ref = ref_mlp(x, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"], mask,
                          tau, e, n_shared, "silu", gs, kw["gate_tau"])
            assert rel_err(y, ref) < 1e-2
        check_route(mask, p, ref_mask, t, 1e-4)


def test_routed_select_refuses_what_needs_a_mask():
    gen = torch.Generator().manual_seed(5)
    L = make_layer(gen, 64, 8, 0, 16, torch.bfloat16)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], 8, 0)
    x = torch.randn(1, 64, generator=gen).to(DEV, torch.bfloat16)
    logits = torch.randn(1, 16, device=DEV)
    for kw in ({"compact": True}, {"path": "dense"}, {"counts": torch.zeros(2, 1, dtype=torch.int32, device=DEV)}):
        with pytest.raises(ValueError, match="logits="):
            K.sparse_mlp(x, packed, None, None, None, None, None, "silu", logits=logits, threshold=0.5, **kw)
    x5 = torch.randn(5, 64, generator=gen).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="logits="):
        K.sparse_mlp(x5, packed, None, None, None, None, None, "silu", logits=logits.expand(5, 16), threshold=0.5,
                     path="triton")
    with pytest.raises(ValueError, match="pass mask"):
        K.sparse_mlp(x, packed, None, None, None, None, None, "silu")


def test_pack_makes_no_copy():
    gen = torch.Generator().manual_seed(9)
    L = make_layer(gen, 256, 8, 0, 32, torch.bfloat16)
    p = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], 8, 0)
    assert p["w_gate"].data_ptr() == L["w_gate"].data_ptr()
    assert p["w_up"].data_ptr() == L["w_up"].data_ptr()
    assert p["w_down_t"].data_ptr() == L["w_down_t"].data_ptr()
    assert p["copied"] == []


def test_sparse_mlp_module_one_copy_and_matches_torch(compact):
    """SparseMLP on CUDA: down_proj's storage is re-laid in place (one copy), the kernels read the module's own
    weights, and the output matches the pure-torch path (the CPU reference) on the same mask."""
    transformers = pytest.importorskip("transformers")
    from densesparse import arch, runtime
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    spec = {"layout": arch.LAYOUTS["LlamaForCausalLM"].to_dict(), "activation": "silu", "hidden_size": 256,
            "n_shared": 0, "expert_size": 8, "n_experts": 64, "router_width": 64}
    mlps = runtime.install(model, spec)
    mm = mlps[0]
    mm.threshold = 0.5
    mm.dense_above_tokens = 1 << 30  # the sparse kernels at every T (the dense dispatch off)
    dp = model.model.layers[0].mlp.down_proj
    gp = model.model.layers[0].mlp.gate_proj
    ptr_gate = gp.weight.data_ptr()
    for T in (1, 2, 9):
        x = torch.randn(T, 256, device=DEV, dtype=torch.bfloat16)
        y = mm._cuda_forward(x)
        assert dp.weight.shape == (256, 512) and dp.weight.t().is_contiguous()
        assert gp.weight.data_ptr() == ptr_gate  # gate/up read in place
        packed = mm._kernel_cache[0]
        assert packed["copied"] == [] and packed["w_down_t"].data_ptr() == dp.weight.data_ptr()
        r = mm.router
        mask = K.route(x, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias, 0.5)
        w_gate, w_up, b_gate, b_up, w_down_t, b_down = mm.canonical()
        ref = ref_mlp(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, mask, None, 8, 0, "silu")
        assert rel_err(y, ref) < 1e-2
        # the torch path (F.linear on the transposed-view parameter) agrees with the dense reference too
        full = torch.ones_like(mask)
        y_dense = mm._dense_forward(x)
        ref_dense = ref_mlp(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, full, None, 8, 0, "silu")
        assert rel_err(y_dense, ref_dense) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Library level: a tiny Llama through densesparse.runtime.install, CUDA path vs the pure-torch path
# ---------------------------------------------------------------------------------------------------------------
def _tiny_sparse_llama(seed):
    transformers = pytest.importorskip("transformers")
    import copy

    from densesparse import arch, runtime
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    dense = copy.deepcopy(model)
    spec = {"layout": arch.LAYOUTS["LlamaForCausalLM"].to_dict(), "activation": "silu", "hidden_size": 256,
            "n_shared": 16, "expert_size": 8, "n_experts": 126, "router_width": 64}
    mlps = runtime.install(model, spec)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mm in mlps:
            for lin, scale in ((mm.router.w1, 1.0), (mm.router.w2, 2.0)):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * scale * lin.in_features ** -0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
    return model, dense, mlps


@pytest.mark.parametrize("B,S", [(1, 1), (2, 1), (1, 9), (2, 24)])
def test_library_llama_cuda_matches_torch(B, S, compact, monkeypatch):
    """install() on a tiny bf16 Llama (2 shared blocks + 126 experts of 8): logits of the CUDA path (router +
    Triton/dense-with-mask kernels, input_tau and down_tau on) match the pure-torch path on the same expert
    masks (rel err < 2e-2); the router's masks match the float64 reference (tie band); threshold 1 with taus 0
    is the dense model."""
    no_triton_path(compact, B * S)
    from densesparse import runtime
    model, dense, mlps = _tiny_sparse_llama(100 + 10 * B + S)
    for mm in mlps:  # the sparse kernels at every T (the dense dispatch off; see test_dense_dispatch)
        mm.dense_above_tokens = 1 << 30
    gen = torch.Generator().manual_seed(7 * B + S)
    ids = torch.randint(0, 512, (B, S), generator=gen).to(DEV)
    with torch.no_grad():
        ref_dense = dense(input_ids=ids).logits
        # dense shortcut before any CUDA-path call (weights as loaded)
        assert rel_err(model(input_ids=ids).logits, ref_dense.double()) < 1e-3
        # calibrate taus on this input: cut ~30% of input channels and ~30% of the rest by |h| * ||down row||
        caps = []
        hooks = [mm.register_forward_pre_hook(lambda mod, args: caps.append(args[0].reshape(-1, 256)))
                 for mm in mlps]
        model(input_ids=ids)
        for hk in hooks:
            hk.remove()
        for mm, xin in zip(mlps, caps):
            mm.input_tau = torch.quantile(xin.abs().float().flatten(), 0.3).item()
            h = mm.hidden_states(mm.sparse_input(xin)).float().abs() * mm.down_norms()
            mm.down_tau = torch.quantile(h[h > 0].flatten(), 0.3).item()
            mm.threshold = 0.7
            assert mm.input_tau > 0 and mm.down_tau > 0

        # CUDA path, recording the router's inputs and masks (decode calls route_logits and the gate/up tiles
        # select by the rule route() applies: the mask is route()'s on the same input)
        rec = []
        real_route, real_logits = K.route, K.route_logits

        def route_rec(x, *a):
            mk = real_route(x, *a)
            rec.append((x.clone(), mk.clone()))
            return mk

        def logits_rec(x, *a):
            rec.append((x.clone(), real_route(x, *a, 0.7).clone()))
            return real_logits(x, *a)
        monkeypatch.setattr(K, "route", route_rec)
        monkeypatch.setattr(K, "route_logits", logits_rec)
        y_cuda = model(input_ids=ids).logits
        monkeypatch.setattr(K, "route", real_route)
        monkeypatch.setattr(K, "route_logits", real_logits)
        assert len(rec) == len(mlps)
        assert all(mm._kernel_cache is not None for mm in mlps), "the CUDA path did not run"
        assert torch.isfinite(y_cuda).all()
        for mm, (x, mk) in zip(mlps, rec):
            r = mm.router
            ref_mask, p = ref_route(x, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias, 0.7)
            check_route(mk, p, ref_mask, 0.7, 1e-4 if x.shape[0] <= 16 else 3e-2)
            kept = mk.float().mean().item()
            assert 0.05 < kept < 0.95, kept

        # pure-torch path on the same masks
        for mm, (_, mk) in zip(mlps, rec):
            monkeypatch.setattr(mm, "select", lambda x2, _mk=mk: _mk)
        monkeypatch.setattr(runtime, "_kernels", lambda: None)
        y_torch = model(input_ids=ids).logits
        monkeypatch.undo()
        err = rel_err(y_cuda, y_torch.double())
        assert err < 2e-2, err
        # the sparse model is not the dense one (the taus and the router cut real work)
        assert rel_err(y_cuda, ref_dense.double()) > 10 * err

        # dense shortcut after the CUDA path re-laid down_proj in place: still the dense model
        for mm in mlps:
            mm.threshold, mm.down_tau, mm.input_tau = 1.0, 0.0, 0.0
        assert rel_err(model(input_ids=ids).logits, ref_dense.double()) < 1e-3
        # and threshold 1 with the CUDA path forced (taus 0, all experts on) agrees with dense too
        for mm in mlps:
            mm.stats = runtime.LayerStats(mm.n_experts)
        y_all = model(input_ids=ids).logits
        assert rel_err(y_all, ref_dense.double()) < 2e-2


@pytest.mark.parametrize("mode", ["r2sel", "persistent"])
@pytest.mark.parametrize("T,n_e,r", [(1, 1792, 64), (2, 448, 64), (4, 14336, 64), (16, 1792, 256), (1, 7, 64),
                                     (16, 3000, 96), (9, 112, 128)])
def test_route_fused_matches_three_launches(T, n_e, r, mode, monkeypatch):
    """T <= 16: the r2sel router (R2 + select in one launch, last program per token selects) and the one-launch
    persistent router (grid barriers) give the three-launch path's mask (up to fp32 summation order: only at a
    tie), also over repeated calls (the counters reset) and in a graph."""
    gen = torch.Generator().manual_seed(T * 131 + n_e + r)
    d = 4096 if n_e >= 1792 else 512
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    r_w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, torch.bfloat16)
    r_b1 = (torch.randn(r, generator=gen) * 0.1).to(DEV, torch.bfloat16)
    r_w2 = (torch.randn(n_e, r, generator=gen) * 2 * r ** -0.5).to(DEV, torch.bfloat16)
    r_b2 = (torch.randn(n_e, generator=gen) * 0.1).to(DEV, torch.bfloat16)
    for t in (0.3, 0.7, 0.95, 1.0):
        monkeypatch.setitem(K.CONFIG, "router", "three")
        ref3 = K.route(x, r_w1, r_b1, r_w2, r_b2, t)
        monkeypatch.setitem(K.CONFIG, "router", mode)
        outs = [K.route(x, r_w1, r_b1, r_w2, r_b2, t) for _ in range(5)]
        ref_mask, p = ref_route(x, r_w1, r_b1, r_w2, r_b2, t)
        for mk in outs:
            assert (mk != ref3).float().mean().item() < 1e-3
            check_route(mk, p, ref_mask, t, 1e-4)
        if t == 1.0:
            assert outs[0].all()
    key = (x.device.type, x.device.index)
    assert K._ROUTER_BAR[key].abs().sum().item() == 0, "barrier counters not left zeroed"
    # in a CUDA graph, replayed with new inputs
    x_static = x.clone()
    g, mk_g = capture_graph(lambda: K.route(x_static, r_w1, r_b1, r_w2, r_b2, 0.5))
    for _ in range(3):
        x_static.copy_(torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        ref_mask, p = ref_route(x_static, r_w1, r_b1, r_w2, r_b2, 0.5)
        check_route(mk_g, p, ref_mask, 0.5, 1e-4)
    assert K._ROUTER_BAR[key].abs().sum().item() == 0


@pytest.mark.parametrize("T", [1, 2, 3, 4, 16, 40])
def test_dense_dispatch(T, monkeypatch):
    """A call with more tokens than dense_above_tokens runs the dense MLP: no router call, the dense model's
    output (exact up to bf16), counted as dense in the stats (every expert, neuron and input channel; no router
    FLOPs). At or below it the router runs and the output is sparse. A large value restores the sparse path."""
    from densesparse import runtime
    model, dense, mlps = _tiny_sparse_llama(300 + T)
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, 512, (1, T), generator=gen).to(DEV)
    calls = []
    real_route = K.route

    def route_rec(x, *a):
        calls.append(x.shape[0])
        return real_route(x, *a)
    monkeypatch.setattr(K, "route", route_rec)
    with torch.no_grad():
        ref_dense = dense(input_ids=ids).logits.double()
        for mm in mlps:
            mm.threshold, mm.down_tau, mm.input_tau = 0.5, 0.05, 0.01
            mm.stats = runtime.LayerStats(mm.n_experts)
        y = model(input_ids=ids).logits
        thr = runtime.DENSE_ABOVE_TOKENS
        assert all(mm.dense_above_tokens == thr for mm in mlps)
        if T > thr:
            assert calls == [] and rel_err(y, ref_dense) < 1e-3
            for mm in mlps:
                s = mm.stats
                assert s.tokens == T and s.routed_tokens == 0 and s.experts == T * mm.n_experts
                assert s.gate_cells == s.up_cells == T * mm.intermediate * mm.hidden
                assert s.up_rows == T * mm.intermediate
                assert s.input_channels == s.decide_channels == T * mm.hidden
                assert s.down_neurons == T * mm.intermediate
                assert s.hist[mm.n_experts].item() == T
        else:
            assert calls == [T] * len(mlps) and rel_err(y, ref_dense) > 1e-2
            assert all(mm.stats.routed_tokens == T and mm.stats.experts < T * mm.n_experts for mm in mlps)
        # dispatch off: the sparse path at every T (today's behaviour before the dial)
        calls.clear()
        for mm in mlps:
            mm.dense_above_tokens = 1 << 30
        y_sparse = model(input_ids=ids).logits
        assert calls == [T] * len(mlps) and rel_err(y_sparse, ref_dense) > 1e-2


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("T,e,n_shared,biases", [(1, 8, 0, False), (2, 8, 2, True), (5, 32, 1, True),
                                                 (16, 4, 0, False)])
def test_down_deterministic(T, e, n_shared, biases, det, compact, monkeypatch):
    """The decode down kernel with fixed-order partial sums (dn_deterministic) matches the reference and gives
    bit-identical outputs over repeated calls; the atomic one matches the reference (its last bit may vary)."""
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", det)
    gen = torch.Generator().manual_seed(T * 97 + e + int(det) + 2 * int(compact))
    d, n_e = 1000, 300 // e * 4
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, biases=biases)
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    mask = (torch.rand(T, n_e, generator=gen) < 0.4).to(DEV)
    ref = ref_mlp(x, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"], mask, None, e,
                  n_shared, "silu")
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    ys = []
    for _ in range(6):
        poison_allocator()
        ys.append(K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, None, "silu", path="triton"))
    assert all(torch.isfinite(y).all() for y in ys)
    assert rel_err(ys[0], ref) < 1e-2
    assert torch.count_nonzero(packed["acc"]).item() == 0 and torch.count_nonzero(packed["cnt"]).item() == 0
    if det:
        assert all(torch.equal(y, ys[0]) for y in ys[1:])


# ---------------------------------------------------------------------------------------------------------------
# Gate dial through SparseMLP: CUDA path vs the pure-torch path (outputs and stats)
# ---------------------------------------------------------------------------------------------------------------
def _capture_inputs(model, mlps, ids):
    caps = []
    hooks = [mm.register_forward_pre_hook(lambda mod, args: caps.append(args[0].reshape(-1, 256).clone()))
             for mm in mlps]
    model(input_ids=ids)
    for hk in hooks:
        hk.remove()
    return caps


def _run_both(model, mlps, ids, monkeypatch):
    """(logits, stats) of the CUDA path, then of the pure-torch path on the CUDA pass's expert masks."""
    out = _run_both_fwd(lambda: model(input_ids=ids).logits, mlps, monkeypatch)
    assert all(mm._kernel_cache is not None for mm in mlps), "the CUDA path did not run"
    return out


def _run_both_fwd(fwd, mlps, monkeypatch):
    """fwd()'s output and the mlps' stats on the CUDA path, then on the pure-torch path with each mlp given the mask
    the CUDA pass routed for it (route calls in layer order, one per mlp)."""
    from densesparse import runtime
    rec = []
    real_route = K.route

    def route_rec(x, *a):
        mk = real_route(x, *a)
        rec.append(mk.clone())
        return mk
    for mm in mlps:
        mm.stats = runtime.LayerStats(mm.n_experts)
    monkeypatch.setattr(K, "route", route_rec)
    y_cuda = fwd()
    monkeypatch.setattr(K, "route", real_route)
    st_cuda = [mm.stats for mm in mlps]
    with monkeypatch.context() as mp:
        if rec:
            for mm, mk in zip(mlps, rec):
                mp.setattr(mm, "select", lambda x2, _mk=mk: _mk)
        mp.setattr(runtime, "_kernels", lambda: None)
        for mm in mlps:
            mm.stats = runtime.LayerStats(mm.n_experts)
        y_torch = fwd()
    st_torch = [mm.stats for mm in mlps]
    for mm in mlps:
        mm.stats = None
    return y_cuda, st_cuda, y_torch, st_torch


def _same_stats(a, b, band=0.0, hidden=0):
    """Exact on what both paths take from the same mask and input; gate_cells / up_cells / up_rows / down_neurons
    within `band` (relative: the bf16 torch path and the fp32 kernels may decide a neuron sitting on a threshold
    differently; deciding early, the down skip's decisions also set which gate rows are completed) plus one such
    neuron per token (a gate or up row costs at most `hidden` cells), which at one token and ~70-100 kept neurons is
    more than 1%."""
    keys = ("tokens", "routed_tokens", "experts", "input_channels", "decide_channels")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]
    assert torch.equal(a.hist, b.hist)
    for key, row in (("gate_cells", hidden), ("up_cells", hidden), ("up_rows", 1), ("down_neurons", 1)):
        va, vb = getattr(a, key), getattr(b, key)
        slack = band * vb + (a.tokens * row if band > 0 else 0)
        assert abs(va - vb) <= slack, (key, va, vb)


def _dial_taus(model, mlps, ids):
    """Calibrate gate_scale on the layers' inputs for ids; per layer (gate tau at the median score, input tau at
    30% of |x|, down tau at 30% of |h| * ||down row||). Sets dense_above_tokens so T=9 takes the dense-with-mask
    kernels, not the dense dispatch."""
    for mm in mlps:
        mm.dense_above_tokens = 1 << 30
        mm.gate_scale.data = torch.ones(mm.intermediate, device=DEV, dtype=torch.bfloat16)
    caps = _capture_inputs(model, mlps, ids)
    for mm, xin in zip(mlps, caps):
        mm.calibrate_gate_scale(xin)
    taus = []
    for mm, xin in zip(mlps, caps):
        g, _ = mm.gate_and_up(xin)
        score = g.abs().float() * mm.gate_scale.float()
        h = mm.hidden_states(xin).float().abs() * mm.down_norms()
        taus.append((torch.quantile(score.flatten(), 0.5).item(),
                     torch.quantile(xin.abs().float().flatten(), 0.3).item(),
                     torch.quantile(h.flatten(), 0.3).item()))
    return taus


def _all_dials_on(model, mlps, ids, threshold=0.7):
    for mm, (gt, it, dt) in zip(mlps, _dial_taus(model, mlps, ids)):
        mm.threshold, mm.gate_tau, mm.input_tau, mm.down_tau = threshold, gt, it, dt


@pytest.mark.parametrize("B,S", [(1, 1), (2, 1), (1, 9)])
def test_library_gate_dial_cuda_matches_torch(B, S, compact, monkeypatch):
    """Tiny bf16 Llama, gate_scale calibrated (mean |up| x down-row norm), gate_tau at the median score: alone,
    with the router threshold, + input_tau, + down_tau. CUDA logits = torch logits on the same masks; layer 0's
    stats (same input on both paths) equal the torch path's (up rows / down neurons within a 1% tie band); the
    gate dial cuts real up rows."""
    no_triton_path(compact, B * S)
    model, _, mlps = _tiny_sparse_llama(700 + 10 * B + S)
    gen = torch.Generator().manual_seed(11 * B + S)
    ids = torch.randint(0, 512, (B, S), generator=gen).to(DEV)
    with torch.no_grad():
        taus = _dial_taus(model, mlps, ids)
        for thr, use_in, use_down in ((1.0, False, False), (0.7, False, False), (0.7, True, False),
                                      (0.7, True, True)):
            for mm, (gt, it, dt) in zip(mlps, taus):
                mm.threshold, mm.gate_tau = thr, gt
                mm.input_tau, mm.down_tau = (it if use_in else 0.0), (dt if use_down else 0.0)
            y_cuda, st_cuda, y_torch, st_torch = _run_both(model, mlps, ids, monkeypatch)
            assert torch.isfinite(y_cuda).all()
            err = rel_err(y_cuda, y_torch.double())
            assert err < 2e-2, (thr, use_in, use_down, err)
            _same_stats(st_cuda[0], st_torch[0], band=0.01, hidden=mlps[0].hidden)
            for s in st_cuda:
                assert s.up_cells < 0.7 * s.gate_cells, "the gate dial cut too few up rows"


@pytest.mark.parametrize("T", [1, 2, 9])
def test_module_gate_dial_stats_exact(T, compact, monkeypatch):
    """One SparseMLP, one input: stats of the CUDA path equal the torch path's exactly when no decision sits on a
    threshold (gate_scale 1e-4 or 1e4 per neuron, gate_tau 1: |act(gate)| * gate_scale is far from 1 unless
    |act(gate)| ~ 1e-4); with down_tau (20% of the kept neurons' |h| * ||down row||), down neurons within a 1% tie
    band. Outputs agree too: within 2e-2, and 5e-2 with down_tau, whose decisions the torch path takes on bf16
    h * norm and the kernels in fp32 (a neuron on the threshold flipped moves y by about tau, a few % of y here,
    where the router keeps few experts). The last two settings take early decisions (decide_tau: the cells of the
    rows the dials drop count only the decision channels)."""
    no_triton_path(compact, T)
    _, _, mlps = _tiny_sparse_llama(900 + T)
    mm = mlps[0]
    gen = torch.Generator().manual_seed(T)
    with torch.no_grad():
        mm.dense_above_tokens = 1 << 30
        mm.gate_scale.data = torch.where(torch.rand(mm.intermediate, generator=gen) < 0.5, 1e-4, 1e4).to(
            DEV, torch.bfloat16)
        x = torch.randn(T, 256, generator=gen).to(DEV, torch.bfloat16)
        h = mm.hidden_states(x).float().abs() * mm.down_norms()
        dt = torch.quantile(h[h > 0], 0.2).item()
        for thr, input_tau, down_tau, decide in ((1.0, 0.0, 0.0, 0.0), (0.7, 0.0, 0.0, 0.0), (0.7, 0.3, 0.0, 0.0),
                                                 (0.7, 0.3, dt, 0.0), (0.7, 0.3, dt, 1.0), (1.0, 0.0, dt, 1.0)):
            mm.threshold, mm.gate_tau, mm.input_tau, mm.down_tau = thr, 1.0, input_tau, down_tau
            mm.decide_tau = decide  # early decisions on the channels with |x| >= 1 (about a third of them)
            y_cuda, st_cuda, y_torch, st_torch = _run_both_module(mm, x, monkeypatch)
            err = rel_err(y_cuda, y_torch.double())
            assert err < (5e-2 if down_tau > 0 else 2e-2), (thr, input_tau, down_tau, decide, err)
            _same_stats(st_cuda, st_torch, band=0.01 if down_tau > 0 else 0.0, hidden=mm.hidden)
            rows = st_cuda.tokens * mm.n_shared + st_cuda.experts * mm.expert_size  # the routed rows
            assert st_cuda.up_rows < 0.7 * rows, "the gate dial cut too few up rows"


def _run_both_module(mm, x, monkeypatch):
    y_cuda, st_cuda, y_torch, st_torch = _run_both_fwd(lambda: mm(x), [mm], monkeypatch)
    return y_cuda, st_cuda[0], y_torch, st_torch[0]


@pytest.mark.parametrize("T", [1, 2, 9])
def test_module_bias_correction_matches_torch(T, compact, monkeypatch):
    """A layer with a bias correction (budget_bias rows, interpolated by bias_mix) adds the same bias on the CUDA
    path (folded into the kernels' down bias) as on the torch path, with the router, input and down taus on; the
    bias follows a move of the parameter to another dtype (bias_now recomputes) and an in-place change of the
    model's own down bias."""
    from torch import nn
    _, _, mlps = _tiny_sparse_llama(1200 + T)
    mm = mlps[0]
    gen = torch.Generator().manual_seed(1201 + T)
    with torch.no_grad():
        mm.threshold, mm.dense_above_tokens = 0.6, 1 << 30
        xc = torch.randn(256, 256, generator=gen).to(DEV, torch.bfloat16)
        mm.input_tau = torch.quantile(xc.abs().float().flatten(), 0.3).item()
        mm.down_tau = torch.quantile((mm.hidden_states(xc).float().abs() * mm.down_norms()).flatten(), 0.3).item()
        mm.budget_bias = nn.Parameter(torch.randn(3, 256, generator=gen).to(DEV, torch.bfloat16),
                                      requires_grad=False)
        mm.bias_mix = (0, 2, 0.25)
        x = torch.randn(T, 256, generator=gen).to(DEV, torch.bfloat16)
        y_cuda, _, y_torch, _ = _run_both_module(mm, x, monkeypatch)
        assert rel_err(y_cuda, y_torch.double()) < 2e-2
        want = mm.budget_bias[0].float() * 0.75 + mm.budget_bias[2].float() * 0.25
        mm.bias_mix = None
        y_plain, _, _, _ = _run_both_module(mm, x, monkeypatch)
        assert rel_err((y_cuda.float() - y_plain.float()).mean(0), want.double()) < 2e-2
        mm.bias_mix = (0, 2, 0.25)
        mm.budget_bias.data = mm.budget_bias.data.float()
        assert mm.bias_now(x).dtype == torch.bfloat16 and torch.allclose(mm.bias_now(x).float(), want, atol=1e-2)
        # a down bias of the model's own, then changed in place: the folded bias follows it
        mm.budget_bias.data = mm.budget_bias.data.to(torch.bfloat16)
        down = mm._down_module()
        down.bias = nn.Parameter(torch.zeros(256, device=DEV, dtype=torch.bfloat16), requires_grad=False)
        y_zero = mm(x).float()
        down.bias.add_(1.0)
        shift = mm(x).float() - y_zero
        assert abs(shift.mean().item() - 1.0) < 2e-2 and shift.abs().max().item() < 1.2


# ---------------------------------------------------------------------------------------------------------------
# Per-call choice of the compacted path (sparse_mlp(compact=...), SparseMLP by expert_frac and runtime.COMPACT_BELOW)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dial", [False, True])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("e,n_shared,n_e", [(8, 0, 120), (16, 1, 40), (1, 2, 301)])
def test_compact_argument_equals_config_path(e, n_shared, n_e, T, dial, monkeypatch):
    """compact=True / False per call runs exactly the kernels CONFIG["compact"] = True / False runs (bit for bit,
    deterministic down reduction), whatever CONFIG says; compact=None follows CONFIG."""
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    gen = torch.Generator().manual_seed(7100 + 10 * e + T + int(dial))
    d = 256
    L = make_layer(gen, d, e, n_shared, n_e, torch.bfloat16, True, True)
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    mask = (torch.rand(T, n_e, generator=gen) < 0.3).to(DEV)
    packed = K.pack(L["w_gate"], L["w_up"], L["w_down_t"], e, n_shared)
    kw = {}
    if dial:
        gs = realistic_gate_scale(gen, L, d, torch.bfloat16)
        kw = {"gate_scale": gs, "gate_tau": float(gs.float().median())}

    def call(compact):
        return K.sparse_mlp(x, packed, L["b_gate"], L["b_up"], L["b_down"], mask, None, "silu", path="triton",
                            compact=compact, **kw)
    by_cfg = {}
    for flag in (False, True):
        monkeypatch.setitem(K.CONFIG, "compact", flag)
        by_cfg[flag] = call(None)
    for flag in (False, True):
        for cfg_flag in (False, True):
            monkeypatch.setitem(K.CONFIG, "compact", cfg_flag)
            assert torch.equal(call(flag), by_cfg[flag]), (flag, cfg_flag)
    if not dial:  # (the dial's reference, with its tie band, is test_gate_dial_matches_reference's)
        ref = ref_mlp(x, L["w_gate"], L["w_up"], L["w_down_t"], L["b_gate"], L["b_up"], L["b_down"], mask, None, e,
                      n_shared, "silu")
        for flag in (False, True):
            assert rel_err(by_cfg[flag], ref) < 1e-2


@pytest.mark.parametrize("dial", [False, True])
def test_module_compact_rule_matches_torch(dial, monkeypatch):
    """SparseMLP takes the compacted kernels exactly for one-token calls with expert_frac <= COMPACT_BELOW, and
    its output equals the pure-torch path on the same mask either way (below / above the constant, T 1 and 2)."""
    from densesparse import runtime
    monkeypatch.setitem(K.CONFIG, "compact", False)
    below = runtime.COMPACT_BELOW if runtime.COMPACT_BELOW > 0 else 0.4
    monkeypatch.setattr(runtime, "COMPACT_BELOW", below)
    _, _, mlps = _tiny_sparse_llama(950 + int(dial))
    mm = mlps[0]
    seen = []
    real = K.sparse_mlp

    def rec(*a, **k):
        seen.append(k.get("compact"))
        return real(*a, **k)
    monkeypatch.setattr(K, "sparse_mlp", rec)
    gen = torch.Generator().manual_seed(951 + int(dial))
    with torch.no_grad():
        mm.threshold = 0.6
        mm.dense_above_tokens = 1 << 30
        if dial:
            xc = torch.randn(256, 256, generator=gen).to(DEV, torch.bfloat16)
            mm.gate_scale.data = torch.ones(mm.intermediate, device=DEV, dtype=torch.bfloat16)
            mm.calibrate_gate_scale(xc)
            sc = mm.gate_and_up(xc)[0].float().abs() * mm.gate_scale.float()
            mm.gate_tau = float(sc.median())
        for T in (1, 2):
            x = torch.randn(T, 256, generator=gen).to(DEV, torch.bfloat16)
            for frac in (below - 0.05, below, below + 0.05, 1.0):
                mm.expert_frac = frac
                seen.clear()
                y_cuda, st_cuda, y_torch, st_torch = _run_both_module(mm, x, monkeypatch)
                want = True if (T == 1 and frac <= below) else None
                assert seen == [want], (T, frac, seen)
                # with the dial, a neuron on the gate threshold may flip between the bf16 torch path and the
                # kernels (one neuron's whole output: 2.9% once on the H100), as with down tau above
                assert rel_err(y_cuda, y_torch.double()) < (5e-2 if dial else 2e-2), (T, frac)
                _same_stats(st_cuda, st_torch, band=0.01 if dial else 0.0, hidden=mm.hidden)


def test_module_routed_select_rule(monkeypatch):
    """SparseMLP routes a call through route_logits (selection in the gate/up tiles) exactly when it runs the
    non-compacted Triton decode kernels without stats on at most CONFIG["routed_max_t"] tokens (one by default);
    every other routed call takes route()'s mask. Either way
    the output equals the pure-torch path on route()'s mask for that input."""
    from densesparse import runtime
    monkeypatch.setitem(K.CONFIG, "compact", False)
    _, _, mlps = _tiny_sparse_llama(970)
    mm = mlps[0]
    calls = []
    real_route, real_logits = K.route, K.route_logits
    monkeypatch.setattr(K, "route", lambda *a: calls.append("mask") or real_route(*a))
    monkeypatch.setattr(K, "route_logits", lambda *a: calls.append("logits") or real_logits(*a))
    gen = torch.Generator().manual_seed(971)
    with torch.no_grad():
        mm.threshold = 0.6
        mm.dense_above_tokens = 1 << 30
        for T, frac, stats in ((1, 1.0, False), (2, 1.0, False), (1, 0.1, False), (9, 1.0, False), (1, 1.0, True)):
            x = torch.randn(T, 256, generator=gen).to(DEV, torch.bfloat16)
            mm.expert_frac = frac
            mm.stats = runtime.LayerStats(mm.n_experts) if stats else None
            calls.clear()
            y = mm(x)
            routed = T <= K.CONFIG["routed_max_t"] and frac > runtime.COMPACT_BELOW and not stats
            assert calls == (["logits"] if routed else ["mask"]), (T, frac, stats, calls)
            r = mm.router
            mask = real_route(x, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias, 0.6)
            with monkeypatch.context() as mp:
                mp.setattr(mm, "select", lambda x2: mask)
                mp.setattr(runtime, "_kernels", lambda: None)
                mm.stats = None
                y_torch = mm(x)
            assert rel_err(y, y_torch.double()) < 2e-2, (T, frac, stats)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: the custom ops inside compiled graphs (fullgraph, and transformers' static-cache generate)
# ---------------------------------------------------------------------------------------------------------------
def _count_kernel_calls(monkeypatch):
    """Counts the decode kernels' host wrapper: the custom op's body looks it up at run time, so calls made by a
    compiled graph count too (CUDA-graph replays launch without it)."""
    calls = []
    real = K._decode_impl

    def counted(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)
    monkeypatch.setattr(K, "_decode_impl", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("B", [1, 2])
def test_compile_fullgraph_matches_eager(B, bias, monkeypatch):
    """torch.compile(fullgraph=True) traces the sparse model (decode: one token per sequence) with no graph break
    (after one eager call laid out the weights) and reproduces the eager CUDA path: router, input skip, gate dial
    and down skip on (and the bias correction); the down reduction is deterministic, so only the compiled non-MLP
    ops round differently. The Triton decode kernels run inside the compiled graph."""
    S = 1
    from torch import nn
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    model, dense, mlps = _tiny_sparse_llama(1300 + 10 * B + S)
    gen = torch.Generator().manual_seed(1301 + 10 * B + S)
    ids = torch.randint(0, 512, (B, S), generator=gen).to(DEV)
    with torch.no_grad():
        _all_dials_on(model, mlps, ids)
        if bias:
            for mm in mlps:
                mm.budget_bias = nn.Parameter(0.1 * torch.randn(3, 256, generator=gen).to(DEV, torch.bfloat16),
                                              requires_grad=False)
                mm.bias_mix = (0, 2, 0.25)
        eager = model(input_ids=ids).logits
        calls = _count_kernel_calls(monkeypatch)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        y1 = compiled(input_ids=ids).logits
        y2 = compiled(input_ids=ids).logits
        ref_dense = dense(input_ids=ids).logits
    assert len(calls) == 2 * len(mlps), calls
    assert torch.equal(y1, y2)
    err = rel_err(y1, eager.double())
    assert err < 2e-2, err
    assert rel_err(y1, ref_dense.double()) > 10 * err, "the dials cut nothing"
    torch._dynamo.reset()


@pytest.mark.parametrize("T", [1, 2, 9])
def test_compile_module_matches_eager(T, monkeypatch):
    """One SparseMLP compiled alone (fullgraph) on the eager call's input, every dial on: the same router mask,
    so the compiled output equals the eager one up to inductor's rounding of the glue (input cut, bias adds),
    on the decode kernels (T <= DECODE_MAX_T) and on the dense-with-mask path (T = 9)."""
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    model, _, mlps = _tiny_sparse_llama(1350 + T)
    gen = torch.Generator().manual_seed(1351 + T)
    ids = torch.randint(0, 512, (1, 16), generator=gen).to(DEV)
    with torch.no_grad():
        _all_dials_on(model, mlps, ids)
        mm = mlps[1]
        x = torch.randn(T, 256, generator=gen).to(DEV, torch.bfloat16)
        eager = mm(x)
        torch._dynamo.reset()
        compiled = torch.compile(mm, fullgraph=True, dynamic=False)
        y = compiled(x)
        dense = mm._dense_forward(x)
    err = rel_err(y, eager.double())
    assert err < 1e-2, err
    assert rel_err(y, dense.double()) > 10 * err, "the dials cut nothing"
    torch._dynamo.reset()


def test_generate_static_cache_compiled(monkeypatch):
    """model.generate with a static cache on CUDA: transformers compiles the decode step (torch.compile,
    "reduce-overhead" = CUDA-graph trees) through the custom ops. Its greedy tokens and scores equal the same
    generation with compilation disabled, up to a near-tie; the kernels ran inside the compiled step."""
    monkeypatch.setitem(K.CONFIG, "dn_deterministic", True)
    model, _, mlps = _tiny_sparse_llama(1400)
    gen = torch.Generator().manual_seed(1401)
    ids = torch.randint(0, 512, (1, 6), generator=gen).to(DEV)
    kw = {"max_new_tokens": 10, "do_sample": False, "cache_implementation": "static",
          "return_dict_in_generate": True, "output_scores": True, "pad_token_id": 0}
    with torch.no_grad():
        _all_dials_on(model, mlps, ids)
        out_e = model.generate(ids, disable_compile=True, **kw)
        assert not hasattr(model, "_compiled_call")
        calls = _count_kernel_calls(monkeypatch)
        torch._dynamo.reset()
        out_c = model.generate(ids, **kw)
    assert hasattr(model, "_compiled_call"), "transformers did not compile the decode step"
    assert calls and set(calls) == {1}, calls
    seq_e, seq_c = out_e.sequences[0, 6:].tolist(), out_c.sequences[0, 6:].tolist()
    for i, (a, b) in enumerate(zip(seq_e, seq_c)):
        if a != b:  # only a near-tie may flip (the compiled norms and rotary round differently)
            top = out_e.scores[i][0].float().topk(2).values
            assert float(top[0] - top[1]) < 0.02 * float(top[0].abs()), (i, seq_e, seq_c)
            break
        assert rel_err(out_c.scores[i], out_e.scores[i].double()) < 3e-2, i
    torch._dynamo.reset()


def test_dense_budget_graph_survives_first_sparse_call():
    """A CUDA graph captured at the dense budget (before any sparse call) still replays correctly after the first
    sparse call: the weights are laid out for the kernels on the first CUDA call, dense or not, so no later
    relayout frees storage a graph still reads."""
    model, dense, mlps = _tiny_sparse_llama(1500)
    ids = torch.randint(0, 512, (1, 1), generator=torch.Generator().manual_seed(1501)).to(DEV)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        g, out = capture_graph(lambda: model(input_ids=ids).logits)
        for mm in mlps:
            mm.threshold = 0.7
        assert rel_err(model(input_ids=ids).logits, ref.double()) > 1e-2  # the sparse call ran
        for mm in mlps:
            mm.threshold = 1.0
        torch.cuda.empty_cache()
        g.replay()
        torch.cuda.synchronize()
    assert rel_err(out, ref.double()) < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The bias refinement (densesparse.distill) on CUDA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["LlamaForCausalLM"])
def test_distill_and_quality_budget_on_cuda_use_the_sparse_function(tiny_dir, tmp_path, arch, monkeypatch):
    """distill_biases on a CUDA model refines the sparse function in every layer: a many-token call would take the
    dense MLP (and the kernels have no backward), which the first CUDA version did in layer 0, whose input needs no
    gradient. One float32 step moves the bias row as on the CPU (Adam's first step is the gradient's sign), 30 lower
    the sparse model's KL from dense (measured under runtime.sparse_function, as eval does), and bfloat16 autocast,
    the CUDA default, moves the row by finite steps (the KL of a tiny random model, ~2e-5, is below its
    resolution). The quality budget's bisection measures what eval measures, and eval times the dispatch as deployed."""
    from conftest import kl_from_dense

    from densesparse import convert, load
    from densesparse.config import ConvertConfig
    from densesparse.distill import budget_row, distill_biases
    from densesparse.evaluate import evaluate_windows, quality_budget
    from densesparse.runtime import sparse_function, sparse_mlps

    spec = convert(ConvertConfig(model=str(tiny_dir), out=str(tmp_path / "s"), calib_tokens=600, seq_len=64,
                                 router_epochs=2, expert_size=4, router_width=16, min_budget=0.3, distill_steps=0))
    budgets, row = spec["budgets"], budget_row(spec["budgets"], 0.5)
    win = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(3))

    def first_step(device):
        model = load(tmp_path / "s", mlp_flops=1.0, device=device, dtype=torch.float32)
        mlps = sparse_mlps(model)
        before = torch.stack([m.budget_bias[row].clone() for m in mlps])
        distill_biases(model, mlps, budgets, [win.to(device)], [0.5], 1, torch.Generator().manual_seed(0),
                       bf16=False)
        return (torch.stack([m.budget_bias[row] for m in mlps]) - before).cpu(), model, mlps

    on_cpu, _, _ = first_step("cpu")
    on_cuda, model, mlps = first_step(DEV)
    assert (on_cpu != 0).float().mean() > 0.9
    assert (on_cpu.sign() == on_cuda.sign()).float().mean() > 0.95

    win = win.to(DEV)
    dispatch = [m.dense_above_tokens for m in mlps]
    flags = [p.requires_grad for p in model.parameters()]
    assert max(dispatch) < win.numel()  # the window would take the dense MLP in an ordinary call

    def kl_at_half() -> float:
        with sparse_function(mlps):
            return kl_from_dense(model, mlps, budgets, 0.5, [win])

    kl0 = kl_at_half()
    trace = distill_biases(model, mlps, budgets, [win], [0.5], 30, torch.Generator().manual_seed(0), bf16=False)
    kl1 = kl_at_half()
    assert kl1 < 0.99 * kl0, (kl0, kl1, trace)
    assert [m.dense_above_tokens for m in mlps] == dispatch
    assert [p.requires_grad for p in model.parameters()] == flags
    before = [m.budget_bias[row].clone() for m in mlps]
    trace = distill_biases(model, mlps, budgets, [win], [0.5], 2, torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in trace[0].values())
    moved = [m.budget_bias[row] - b for m, b in zip(mlps, before)]
    assert all(torch.isfinite(d).all() for d in moved) and any(d.abs().max() > 0 for d in moved)
    # the quality budget's bisection measures the same sparse function as eval
    q = quality_budget(model, [win], False, budgets, 0.0)
    rows = evaluate_windows(model, [win], False, [m["target"] for m in q["measured"]], budgets)["rows"]
    assert q["measured"] and all(abs(m["ppl"] - r["ppl"]) < 1e-4 * r["ppl"] for m, r in zip(q["measured"], rows))
    assert [m.dense_above_tokens for m in mlps] == dispatch
    from densesparse import evaluate
    seen, timed = [], evaluate._timed_pass
    monkeypatch.setattr(evaluate, "_timed_pass",
                        lambda mdl, w: seen.append([m.dense_above_tokens for m in mlps]) or timed(mdl, w))
    assert "tokens_per_s" in evaluate_windows(model, [win], False, [0.5], budgets)["rows"][0]
    assert seen == [dispatch]


def test_size_rule_runs_small_layers_dense(monkeypatch):
    """With the size rule on, a one-token call of a layer below SPARSE_MIN_MB returns the dense MLP's output and
    never routes; under sparse_function it runs the kernels (the sparse function) again."""
    from densesparse import runtime
    from densesparse.runtime import SparseMLP, sparse_function

    monkeypatch.setattr(SparseMLP, "size_rule", True)
    transformers = pytest.importorskip("transformers")
    from densesparse import arch
    d, m = 256, 512
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=m, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    spec = {"layout": arch.LAYOUTS["LlamaForCausalLM"].to_dict(), "activation": "silu", "hidden_size": d,
            "n_shared": 0, "expert_size": 8, "n_experts": m // 8, "router_width": 64}
    mlp = runtime.install(model, spec)[0]
    mlp.threshold, mlp.expert_frac = 0.5, 0.5
    x = torch.randn(1, d, device=DEV, dtype=torch.bfloat16)
    calls = []
    route, route_logits = K.route, K.route_logits
    monkeypatch.setattr(K, "route", lambda *a, **k: calls.append(1) or route(*a, **k))
    monkeypatch.setattr(K, "route_logits", lambda *a, **k: calls.append(1) or route_logits(*a, **k))
    assert not runtime.sparse_pays_on_gpu(3 * d * m * 2, 0.5)
    with torch.no_grad():
        y = mlp._cuda_forward(x)
        assert calls == [] and torch.equal(y, mlp._dense_forward(x))
        with sparse_function([mlp]):
            mlp._cuda_forward(x)
    assert calls and mlp.size_rule
