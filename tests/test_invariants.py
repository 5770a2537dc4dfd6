"""Exact invariants on tiny random models of every supported architecture."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, kl_from_dense, tiny_model

from densesparse.arch import activation_name, resolve_layout
from densesparse.config import ConvertConfig
from densesparse.flops import attention_macs, mlp_macs_dense, non_mlp_macs
from densesparse.grouping import permute
from densesparse.io import load
from densesparse.pipeline import _intermediate_size, convert
from densesparse.runtime import LayerStats, apply_budget, install, sparse_mlps


def _spec(model, expert_size=4, n_shared=0, width=16):
    layout = resolve_layout(model)
    m = _intermediate_size(model, layout)
    return {"layout": layout.to_dict(), "activation": activation_name(model.config, layout),
            "hidden_size": model.config.hidden_size, "n_shared": n_shared, "expert_size": expert_size,
            "n_experts": (m - n_shared) // expert_size, "router_width": width}


def _ids(n=24, seed=0):
    return torch.randint(3, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def test_permutation_reproduces_logits(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense = _logits(model, ids)
    mlps = install(model, _spec(model))
    gen = torch.Generator().manual_seed(1)
    for mlp in mlps:
        permute(mlp, torch.randperm(mlp.intermediate, generator=gen))
    assert torch.allclose(_logits(model, ids), dense, atol=1e-5)


@torch.no_grad()
def test_all_experts_on_equals_dense_through_sparse_path(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense = _logits(model, ids)
    mlps = install(model, _spec(model, n_shared=8))
    for mlp in mlps:
        mlp.threshold, mlp.down_tau = 1.0, 0.0
        mlp.stats = LayerStats(mlp.n_experts)  # forces the masked sparse path instead of the dense shortcut
    assert torch.allclose(_logits(model, ids), dense, atol=1e-5)
    assert all(m.stats.experts == m.stats.tokens * m.n_experts for m in mlps)


@torch.no_grad()
def test_experts_per_token_falls_with_threshold(arch):
    model = tiny_model(arch)
    ids = _ids(64)
    mlps = install(model, _spec(model))
    means = []
    for t in (0.99, 0.8, 0.6, 0.4, 0.2):
        for mlp in mlps:
            mlp.threshold, mlp.stats = t, LayerStats(mlp.n_experts)
        _logits(model, ids)
        means.append(sum(m.stats.experts / m.stats.tokens for m in mlps))
    assert all(a >= b for a, b in zip(means, means[1:])), means
    assert means[-1] < means[0]
    assert min(m.stats.hist[0] for m in mlps) == 0  # at least one expert per token, always


def test_flops_match_hand_count():
    model = tiny_model("LlamaForCausalLM")
    d, m, heads, kv, hd, vocab = 32, 64, 4, 2, 8, 256
    mlp_parts = [layer.mlp for layer in model.model.layers]
    assert mlp_macs_dense(d, m, True) == 3 * d * m
    attn_proj = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    assert non_mlp_macs(model, mlp_parts) == 2 * attn_proj + d * vocab
    assert attention_macs(model.config, 10.0) == 2 * 2 * heads * hd * 10.0
    gpt2 = tiny_model("GPT2LMHeadModel")
    assert non_mlp_macs(gpt2, [b.mlp for b in gpt2.transformer.h]) == 2 * (3 * 32 * 32 + 32 * 32) + 32 * 256


def _convert(src, out, **kw):
    cfg = ConvertConfig(model=str(src), out=str(out), calib_tokens=600, seq_len=64, router_epochs=2,
                        expert_size=4, router_width=16, min_budget=0.3, **kw)
    return convert(cfg)


@torch.no_grad()
def test_convert_save_load_round_trip_and_generate(tiny_dir, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sparse"
    spec = _convert(tiny_dir, out)
    assert (out / "model.safetensors").exists() and (out / "modeling_densesparse.py").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sparse")]  # staging dir renamed away
    ids = _ids(16)
    dense = _logits(tiny_model(arch), ids)
    ours = load(out, mlp_flops=1.0)
    assert torch.allclose(_logits(ours, ids), dense, atol=1e-5)  # permuted weights, all on: the dense model
    ours = load(out, mlp_flops=0.5)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    remote.set_mlp_flops(0.5)
    assert type(remote).__name__ == "DenseSparseForCausalLM"
    assert [m.threshold for m in sparse_mlps(remote)] == [m.threshold for m in sparse_mlps(ours)]
    assert torch.allclose(_logits(remote, ids), _logits(ours, ids), atol=1e-5)
    assert spec["n_experts"] * spec["expert_size"] + spec["n_shared"] == spec["intermediate_size"]
    gen = ours.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True,
                        pad_token_id=0, eos_token_id=None)
    assert gen.shape == (1, 11)
    # greedy decoding with the KV cache equals decoding without it
    nocache = ours.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(gen, nocache)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_bias_correction(tiny_dir, tmp_path, arch):
    """--bias-correction: each calibrated budget's bias is the mean (dense - sparse) output on the inputs it was
    measured on, shrunk toward zero (James-Stein: by a factor in [0, 1], 1 where the mean dwarfs its noise);
    apply_budget interpolates it (none at 1.0: still the dense model); it changes the logits; densesparse.load and
    trust_remote_code agree after the round trip."""
    from transformers import AutoModelForCausalLM

    from densesparse.budget import calibrate_budgets, layer_points, set_budget_biases, shrunk_mean

    out = tmp_path / "sparse"
    spec = _convert(tiny_dir, out, bias_correction=True)
    assert spec["bias_correction"]
    ids = _ids(16)
    ours = load(out, mlp_flops=1.0)
    mlps = sparse_mlps(ours)
    assert all(m.budget_bias.shape == (len(spec["budgets"]), m.hidden) for m in mlps)
    assert all(m.bias_now(ids.float()) is None for m in mlps)
    assert torch.allclose(_logits(ours, ids), _logits(tiny_model(arch), ids), atol=1e-5)
    # the definition, on fresh inputs: the points' biases (from their exact re-scoring) are the forward's mean errors
    held = [torch.randn(64, m.hidden, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(mlps)]
    points = [layer_points(m, x, 1.0, down_skip=True) for m, x in zip(mlps, held)]
    spec["budgets"] = calibrate_budgets(points, 0.3)
    set_budget_biases(mlps, points, spec["budgets"])
    factors = []
    for i, b in enumerate(spec["budgets"]):
        apply_budget(mlps, spec["budgets"], b["target"])
        for m, x in zip(mlps, held):
            assert torch.allclose(m.bias_now(x), m.budget_bias[i], atol=1e-7)
            left = (m._dense_forward(x) - m._torch_forward(x)).mean(0)  # the mean error with the bias added
            mean = left + m.budget_bias[i]
            c = float(m.budget_bias[i] @ mean / mean.square().sum())
            assert -1e-6 <= c <= 1 + 1e-6
            assert torch.allclose(m.budget_bias[i], c * mean, atol=1e-6)
            factors.append(c)
    assert max(factors) > 0  # not shrunk away everywhere
    # the shrinkage itself: a mean that dwarfs its noise is kept whole, a mean that is only noise mostly goes
    gen = torch.Generator().manual_seed(0)
    offset = torch.randn(32, generator=gen)
    assert torch.allclose(shrunk_mean(offset + 0.01 * torch.randn(256, 32, generator=gen)), offset, atol=1e-2)
    noise = torch.randn(256, 32, generator=gen)
    assert shrunk_mean(noise).norm() < 0.25 * noise.mean(0).norm()
    lo, hi = spec["budgets"][0]["target"], spec["budgets"][1]["target"]
    apply_budget(mlps, spec["budgets"], (lo + hi) / 2)
    mid = (mlps[0].budget_bias[0] + mlps[0].budget_bias[1]) / 2
    assert torch.allclose(mlps[0].bias_now(held[0]), mid, atol=1e-6)
    # saved biases: both loaders at the default budget (remote code: the budget is set before the weights load),
    # and they matter
    ours = load(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.allclose(_logits(remote, ids), _logits(ours, ids), atol=1e-5)
    with_bias = _logits(ours, ids)
    for m in sparse_mlps(ours):
        m.bias_mix = None
    assert not torch.allclose(_logits(ours, ids), with_bias, atol=1e-5)
    # `calibrate` for another budget grid refits the biases too (one row per new budget, loadable)
    from densesparse.config import CalibrateConfig
    from densesparse.pipeline import calibrate
    spec2 = calibrate(CalibrateConfig(sparse_dir=str(out), calib_tokens=600, seq_len=64, router_epochs=1,
                                      min_budget=0.5))
    assert len(spec2["budgets"]) != len(spec["budgets"])
    again = load(out, mlp_flops=0.5)
    assert all(m.budget_bias.shape == (len(spec2["budgets"]), m.hidden) for m in sparse_mlps(again))
    assert all(m.bias_now(ids.float()) is not None for m in sparse_mlps(again))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_distilled_biases_lower_the_kl_and_touch_only_their_rows(tiny_dir, tmp_path, arch, monkeypatch):
    """--distill-steps: the chosen budget's bias row moves so that the sparse model's KL from the dense model falls
    on the windows it was fitted on; every other row keeps the layer-local bias; convert records it."""
    from densesparse.distill import budget_row, distill_biases

    spec = _convert(tiny_dir, tmp_path / "plain", distill_steps=0)
    assert "bias_distill" not in spec
    model = load(tmp_path / "plain", mlp_flops=1.0)
    mlps = sparse_mlps(model)
    before = [m.budget_bias.detach().clone() for m in mlps]
    flags = [p.requires_grad for p in model.parameters()]
    wins = list(_ids(48, seed=3))
    kl0 = kl_from_dense(model, mlps, spec["budgets"], 0.5, wins)
    trace = distill_biases(model, mlps, spec["budgets"], wins, [0.5], 30, torch.Generator().manual_seed(0), bf16=False)
    kl1 = kl_from_dense(model, mlps, spec["budgets"], 0.5, wins)
    assert kl1 < 0.99 * kl0, (kl0, kl1, trace)  # about 2% on these models: a bias cannot undo much of their error
    row = budget_row(spec["budgets"], 0.5)
    for m, b in zip(mlps, before):
        others = [i for i in range(len(spec["budgets"])) if i != row]
        assert torch.equal(m.budget_bias[others], b[others])
    assert any(not torch.equal(m.budget_bias[row], b[row]) for m, b in zip(mlps, before))
    assert [p.requires_grad for p in model.parameters()] == flags  # left as they were
    # through convert: the same conversion (same seed) but for the distilled row, recorded in the spec
    spec2 = _convert(tiny_dir, tmp_path / "distilled", distill_steps=2, distill_budgets="0.5")
    assert spec2["bias_distill"]["budgets"] == [0.5] and spec2["bias_distill"]["steps"] == 2
    ours = sparse_mlps(load(tmp_path / "distilled", mlp_flops=1.0))
    for m, b in zip(ours, before):
        others = [i for i in range(len(spec2["budgets"])) if i != row]
        assert torch.allclose(m.budget_bias[others], b[others])
    assert any(not torch.allclose(m.budget_bias[row], b[row]) for m, b in zip(ours, before))
    # calibrate refines again when asked, and drops the record when it recomputes the biases without it
    from densesparse.config import CalibrateConfig, ConfigError
    from densesparse.pipeline import calibrate
    common = dict(sparse_dir=str(tmp_path / "distilled"), calib_tokens=600, seq_len=64, router_epochs=1,
                  min_budget=0.3)
    assert calibrate(CalibrateConfig(**common, distill_steps=1, distill_budgets="0.35"))["bias_distill"]["budgets"] \
        == [0.35]
    assert "bias_distill" not in calibrate(CalibrateConfig(**common, distill_steps=0))
    # by default both commands refine the default budgets that the grid calibrates (0.25 is below min_budget here)
    assert calibrate(CalibrateConfig(**common))["bias_distill"]["budgets"] == [0.5, 0.35]
    assert _convert(tiny_dir, tmp_path / "default")["bias_distill"]["steps"] > 0
    # each step runs the first --distill-seq-len tokens of its windows (the whole window where it is shorter)
    import densesparse.pipeline as pipeline
    seen = []

    def recording(model, mlps, budgets, windows, *args, **kwargs):
        seen.append({w.numel() for w in windows})
        return distill_biases(model, mlps, budgets, windows, *args, **kwargs)

    monkeypatch.setattr(pipeline, "distill_biases", recording)
    assert _convert(tiny_dir, tmp_path / "short", distill_steps=1, distill_seq_len=16)["bias_distill"][
        "window_tokens"] == 16
    assert _convert(tiny_dir, tmp_path / "whole", distill_steps=1)["bias_distill"]["window_tokens"] == 64
    assert seen[0] == {16} and max(seen[1]) == 64
    # a model without bias corrections is not refined by default, and refuses an explicit --distill-steps
    assert "bias_distill" not in _convert(tiny_dir, tmp_path / "nobias", bias_correction=False)
    assert "bias_distill" not in calibrate(CalibrateConfig(**dict(common, sparse_dir=str(tmp_path / "nobias"))))
    with pytest.raises(ConfigError, match="has none"):
        calibrate(CalibrateConfig(**dict(common, sparse_dir=str(tmp_path / "nobias")), distill_steps=1,
                                  distill_budgets="0.5"))


def test_budget_dial_moves_thresholds_monotonically(tiny_dir, tmp_path):
    out = tmp_path / "sparse"
    spec = _convert(tiny_dir, out)
    model = load(out)
    mlps = sparse_mlps(model)
    last = None
    for target in (0.3, 0.45, 0.6, 0.8, 1.0):
        apply_budget(mlps, spec["budgets"], target)
        cur = [(m.threshold, -m.down_tau) for m in mlps]
        if last is not None:
            assert all(c[0] >= p[0] - 1e-9 for c, p in zip(cur, last))
        last = cur
    assert all(m.dense for m in mlps)
    assert all(m.expert_frac == 1.0 for m in mlps)
    # calibration records each layer's mean fraction of selected experts per budget; apply_budget sets it
    for b in spec["budgets"]:
        assert len(b["expert_frac"]) == len(mlps) and all(0.0 < f <= 1.0 for f in b["expert_frac"])
        apply_budget(mlps, spec["budgets"], b["target"])
        assert [m.expert_frac for m in mlps] == pytest.approx(b["expert_frac"])
    with pytest.raises(ValueError):
        apply_budget(mlps, spec["budgets"], 1.5)
    with pytest.raises(ValueError):
        apply_budget(mlps, spec["budgets"], 0.01)


def test_apply_budget_sets_expert_frac_and_defaults_without_it():
    """expert_frac is interpolated like the other dials; a spec from before it (no key) gives 1.0 everywhere."""
    model = tiny_model("LlamaForCausalLM")
    mlps = install(model, _spec(model))
    n = len(mlps)
    entry = {"thresholds": [0.5] * n, "down_tau": [0.0] * n, "input_tau": [0.0] * n, "gate_tau": [0.0] * n}
    fracs = [0.2 + 0.1 * i for i in range(n)]
    budgets = [{"target": 0.4, **entry, "expert_frac": fracs}]
    apply_budget(mlps, budgets, 0.4)
    assert [m.expert_frac for m in mlps] == pytest.approx(fracs)
    apply_budget(mlps, budgets, 0.7)  # halfway to the dense end of the grid (1.0)
    assert [m.expert_frac for m in mlps] == pytest.approx([(f + 1.0) / 2 for f in fracs])
    apply_budget(mlps, [{"target": 0.4, **entry}], 0.4)
    assert all(m.expert_frac == 1.0 for m in mlps) and all(m.threshold == 0.5 for m in mlps)


@torch.no_grad()
def test_counted_flops_follow_the_real_masks():
    from densesparse.evaluate import _mlp_macs

    model = tiny_model("LlamaForCausalLM")
    mlps = install(model, _spec(model, expert_size=4, n_shared=8, width=16))
    d, m, routed = 32, 64, 32 * 16 + 16 * 14
    ids = _ids(10)
    for mlp in mlps:  # every input channel dropped: gate/up cost nothing, down still reads all m rows
        mlp.input_tau, mlp.stats = 1e9, LayerStats(mlp.n_experts)
    _logits(model, ids)
    assert _mlp_macs(mlps, [x.stats for x in mlps]) == 2 * d * m
    assert all(x.stats.input_channels == x.stats.decide_channels == 0 for x in mlps)
    for mlp in mlps:  # router on at t -> 0 keeps exactly one expert: shared 8 + 4 rows, router cost counted
        mlp.input_tau, mlp.threshold, mlp.stats = 0.0, 1e-9, LayerStats(mlp.n_experts)
    _logits(model, ids)
    assert all(x.stats.experts == x.stats.tokens for x in mlps)
    assert all(x.stats.input_channels == x.stats.decide_channels == x.stats.tokens * d for x in mlps)
    assert _mlp_macs(mlps, [x.stats for x in mlps]) == 2 * (routed + 3 * d * (8 + 4))
    for mlp in mlps:  # early decisions on no input channel: act(0) scores 0, every neuron dropped at no cost
        mlp.threshold, mlp.gate_tau, mlp.down_tau, mlp.decide_tau = 1.0, 1e-6, 1e-6, 1e9
        mlp.stats = LayerStats(mlp.n_experts)
    _logits(model, ids)
    assert _mlp_macs(mlps, [x.stats for x in mlps]) == 0
    assert all(x.stats.up_rows == 0 and x.stats.decide_channels == 0 < x.stats.input_channels for x in mlps)
    mlp = mlps[0]  # the gate dial alone: the up rows counted are the neurons whose gate score passes, per token
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(1))
    g, u = mlp.gate_and_up(x)
    score = mlp.gate_score(g, u)
    mlp.down_tau, mlp.decide_tau, mlp.gate_tau = 0.0, 0.0, float(score.median())
    mlp.stats = LayerStats(mlp.n_experts)
    mlp(x)
    assert 0 < mlp.stats.up_rows == int((score >= mlp.gate_tau).sum()) < 7 * m


@torch.no_grad()
def test_early_down_skip_judges_partial_sums_and_completes_only_kept_rows():
    """Deciding early, the down skip keeps a neuron by |act(partial gate) * partial up| * ||down row||, and only the
    neurons it keeps pay for completing their gate and up rows beyond the decision channels."""
    model = tiny_model("LlamaForCausalLM")
    mlp = install(model, _spec(model))[0]
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    dec = x.abs() >= x.abs().median()
    g, u = mlp.gate_and_up(x)
    g_dec, u_dec = mlp.gate_and_up(x * dec)
    crit = (g_dec * u_dec).abs() * mlp.down_norms()
    mlp.decide_tau, mlp.down_tau = float(x.abs().median()), float(crit.median())
    keep = crit >= mlp.down_tau
    assert (keep != ((g * u_dec).abs() * mlp.down_norms() >= mlp.down_tau)).any(), "the partial gate changed nothing"
    mlp.stats = LayerStats(mlp.n_experts)
    y = mlp(x)
    assert torch.allclose(y, mlp.down(g * u * keep), atol=1e-6)
    n_dec, n_kept, m = dec.sum(1), keep.sum(1), mlp.intermediate
    assert mlp.stats.gate_cells == mlp.stats.up_cells == int((m * n_dec + n_kept * (32 - n_dec)).sum())
    mlp.stats = None


@torch.no_grad()
def test_budget_points_are_the_layers_real_cost_and_error():
    """Every (MACs, error) point the allocator trades is what the layer really costs and really errs with those
    dials: MACs as the runtime counts them, error = mean squared distance of the output from the dense output."""
    from densesparse.budget import layer_points, set_dials
    from densesparse.evaluate import _mlp_macs
    from densesparse.router import fit_router

    model = tiny_model("LlamaForCausalLM")
    # a narrow router, so that on this tiny layer routing is cheap enough to reach the Pareto front
    mlp = install(model, _spec(model, expert_size=4, n_shared=8, width=4))[0]
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(3))
    with torch.enable_grad():
        fit_router(mlp, x, 20, torch.Generator().manual_seed(0))
    mlp.calibrate_gate_scale(x)
    y_dense = mlp(x)
    points = layer_points(mlp, x, 2.0, down_skip=True, input_skip=True)
    assert len(points) > 5 and {p.threshold for p in points} - {1.0} and any(p.down_tau > 0 for p in points)
    assert any(p.input_tau > 0 for p in points) and any(p.gate_tau > 0 for p in points)
    early = [p for p in points if p.decide_tau > p.input_tau]
    assert any(p.gate_tau > 0 for p in early) and any(p.down_tau > 0 for p in early)
    for p in points:
        set_dials(mlp, p)
        mlp.stats = LayerStats(mlp.n_experts)
        err = float((mlp(x) - y_dense).pow(2).sum(1).mean())
        assert p.err == pytest.approx(2.0 * err, rel=1e-3, abs=1e-9)
        assert p.macs == pytest.approx(_mlp_macs([mlp], [mlp.stats]), rel=1e-6)
        # the recorded fraction of selected experts is the real masks' mean (1 where the router is off)
        assert p.experts == pytest.approx(mlp.stats.experts / (mlp.stats.tokens * mlp.n_experts), rel=1e-6)
    assert {p.experts for p in points if p.threshold == 1.0} == {1.0} and min(p.experts for p in points) < 1.0
    mlp.stats = None


@torch.no_grad()
def test_gate_scale_statistics():
    """gate_scale = RMS(up) (default) or mean |up| over the calibration inputs, times the down-row norm; RMS >= mean
    |.| per neuron (Jensen), equal only where |up| is constant."""
    model = tiny_model("LlamaForCausalLM")
    mlp = install(model, _spec(model))[0]
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(5))
    up = mlp.gate_and_up(x)[1].float()
    norms = mlp.down_norms()
    scales = {}
    for statistic, want in (("rms", up.pow(2).mean(0).sqrt()), ("mean_abs", up.abs().mean(0))):
        mlp.calibrate_gate_scale(x, statistic, chunk=128)  # chunks summed, not averaged per chunk
        scales[statistic] = mlp.gate_scale.clone()
        torch.testing.assert_close(scales[statistic], want * norms, rtol=1e-5, atol=1e-7)
    assert bool((scales["rms"] >= scales["mean_abs"] * (1 - 1e-6)).all())
    assert bool((scales["rms"] > scales["mean_abs"] * 1.01).any())
    # convert sets the scale in the pass that computes the router's targets: the same statistic
    from densesparse.router import expert_output_norms

    for statistic in scales:
        mlp.gate_scale.zero_()
        expert_output_norms(mlp, x, gate_scale=statistic)
        torch.testing.assert_close(mlp.gate_scale, scales[statistic], rtol=1e-5, atol=1e-7)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_collect_keeps_every_windows_ffn_inputs_in_order(arch, monkeypatch):
    """collect's sample is each FFN's input on every window in order, the first windows taken from the sensitivity
    pass's forwards (with gradients on) and the rest from plain forwards; the sensitivities are positive. Without the
    pass, the same inputs and unit weights."""
    from densesparse import stats

    monkeypatch.setattr(stats, "SENSITIVITY_WINDOWS", 2)
    model = tiny_model(arch)
    layout = resolve_layout(model)
    windows = list(torch.cat([_ids(16, seed=7), _ids(16, seed=8)]))
    want = [[] for _ in stats.decoder_layers(model, layout)]
    hooks = [stats.ffn_input_module(layer, layout).register_forward_pre_hook(
        lambda mod, args, i=i: want[i].append(args[0].reshape(-1, 32).to(torch.bfloat16)))
        for i, layer in enumerate(stats.decoder_layers(model, layout))]
    for ids in windows:
        model(input_ids=ids[None], use_cache=False)
    for h in hooks:
        h.remove()
    samples = stats.collect(model, layout, windows)
    for sample, inputs in zip(samples, want):
        assert not sample.x.requires_grad and sample.weight > 0
        torch.testing.assert_close(sample.x, torch.cat(inputs), rtol=0, atol=0)
    # without the sensitivity pass (what a conversion with the loss probe runs): the same inputs, every weight 1
    plain = stats.collect(model, layout, windows, sensitivity=False)
    assert [s.weight for s in plain] == [1.0] * len(want)
    for sample, inputs in zip(plain, want):
        torch.testing.assert_close(sample.x, torch.cat(inputs), rtol=0, atol=0)


def _probe_setup(arch: str):
    """A tiny model with sparse MLPs, windows, their dense logits and each layer's trade-off points."""
    from densesparse import budget

    model = tiny_model(arch)
    wins = list(_ids(40, seed=2))
    dense = _logits(model, torch.stack(wins))
    mlps = install(model, _spec(model))
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    points = []
    for i, mlp in enumerate(mlps):
        mlp.calibrate_gate_scale(x)
        points.append(budget.layer_points(mlp, x, 1.0 + i, down_skip=True, input_skip=True))
    return model, wins, dense, mlps, points


@torch.no_grad()
def test_loss_probe_factors_are_measured_kl_over_estimated_error():
    """probe_losses: each layer's factor is (KL of the model with that layer alone at its probe-budget point) /
    (the point's estimated error), normalised to a geometric mean of 1; the layers are left dense; a layer the
    probe allocation leaves dense keeps factor 1."""
    from densesparse import budget

    model, wins, dense, mlps, points = _probe_setup("LlamaForCausalLM")
    factors = budget.probe_losses(model, mlps, points, wins)
    torch.testing.assert_close(_logits(model, torch.stack(wins)), dense)
    ratios = []
    for mlp, p in zip(mlps, budget.allocate(points, budget.PROBE_BUDGET)):
        assert p.err > 0
        budget.set_dials(mlp, p)
        lp = torch.log_softmax(_logits(model, torch.stack(wins)), -1)
        ref = torch.log_softmax(dense, -1)
        ratios.append(float((ref.exp() * (ref - lp)).sum()) / lp[..., 0].numel() / p.err)
        budget.set_dials(mlp, None)
    assert factors[0] / factors[1] == pytest.approx(ratios[0] / ratios[1], rel=1e-4)
    assert factors[0] * factors[1] == pytest.approx(1.0) and factors[0] != pytest.approx(factors[1])
    assert budget.probe_losses(model, mlps, [points[0], points[1][:1]], wins) == [1.0, 1.0]


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(TINY))
def test_loss_probe_replaying_the_dense_prefix_changes_nothing(arch):
    """With the decoder layers given, the layers before the probed one replay their recorded dense outputs: the
    factors are exactly those of full forwards, and every layer runs its own forward again afterwards."""
    from densesparse import budget
    from densesparse.arch import decoder_layers

    model, wins, dense, mlps, points = _probe_setup(arch)
    layers = decoder_layers(model, resolve_layout(model))
    calls = []
    mlps[0].register_forward_hook(lambda *_: calls.append(1))
    factors = budget.probe_losses(model, mlps, points, wins)
    full = len(calls)
    assert budget.probe_losses(model, mlps, points, wins, layers=layers) == factors
    assert len(calls) - full == full - len(wins)  # the first layer runs no more once the second is probed
    assert all("forward" not in vars(layer) for layer in layers)
    torch.testing.assert_close(_logits(model, torch.stack(wins)), dense)


def test_balanced_kmeans_recovers_separated_groups():
    """k-means++ seeds one centre per well-separated group (each candidate is drawn in proportion to its squared
    distance, so a group already seeded is all but never drawn again) and the balanced assignment then puts each
    group in one cluster of exactly `size` points."""
    from densesparse.grouping import balanced_kmeans, kmeans_plusplus

    gen = torch.Generator().manual_seed(0)
    k, size, dim = 6, 5, 16
    directions = torch.eye(dim)[:k]
    feats = (directions.repeat_interleave(size, 0) + 0.05 * torch.randn(k * size, dim, generator=gen))
    seeds = kmeans_plusplus(torch.nn.functional.normalize(feats, dim=1), k, torch.Generator().manual_seed(1))
    assert sorted(int(i) // size for i in seeds) == list(range(k))
    assign = balanced_kmeans(feats, k, size, torch.Generator().manual_seed(2))
    assert torch.bincount(assign, minlength=k).tolist() == [size] * k
    assert all(len(set(assign[g * size:(g + 1) * size].tolist())) == 1 for g in range(k))


def test_reference_kl_in_chunks_equals_the_whole_window_formula():
    # 45 tokens: one full chunk of KL_ROWS and a partial one
    from densesparse.budget import KL_ROWS, Reference

    g = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(2, 45, 300, generator=g) * 3
    ref = Reference.of(dense)
    log_p = torch.log_softmax(dense, -1)
    assert 45 > KL_ROWS and torch.equal(ref.log_p, log_p)
    log_q = torch.log_softmax(sparse, -1)
    whole = float((log_p.exp() * (log_p - log_q)).sum())
    kl, grad = ref.kl_and_grad(sparse, 45)
    assert kl == pytest.approx(whole, rel=1e-5) and ref.kl(sparse) == kl
    assert torch.equal(grad, (log_q.exp() - log_p.exp()) / 45)
    assert ref.kl(dense) == pytest.approx(0.0, abs=1e-4)


def test_gpu_size_rule_agrees_with_the_measured_sweeps():
    # every batch-1 row of the two H100 records: the rule runs dense wherever the kernels lost, and the kernels
    # wherever they won by 5% or more (between, a near tie, either is fine)
    import importlib.util
    import json
    from pathlib import Path

    from densesparse.runtime import SPARSE_MIN_MB, sparse_pays_on_gpu

    bench = Path(__file__).parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("mlp_shapes", bench / "mlp_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shapes, results = module.SHAPES, bench / "results"
    rows = [r for name in ("gpu-h100-sweep.json", "gpu-h100-size-crossover.json")
            for r in json.loads((results / name).read_text())["mlp"] if r["batch"] == 1]
    assert len(rows) == 84 and {r["shape"] for r in rows} == set(shapes)
    for r in rows:
        d, m = shapes[r["shape"]]
        speedup, pays = r["dense_us"] / r["sparse_us"], sparse_pays_on_gpu(3 * d * m * 2, r["kept"])
        assert (not pays) if speedup < 1 else pays or speedup < 1.05, r
    bounds = [b for _, b in SPARSE_MIN_MB]
    assert bounds == sorted(bounds)
    assert not sparse_pays_on_gpu(1e12, 0.8) and sparse_pays_on_gpu(bounds[0] * 1e6, 0.1)
    assert sparse_pays_on_gpu(bounds[-1] * 1e6, 0.75) and not sparse_pays_on_gpu(bounds[-1] * 1e6 - 1, 0.75)
