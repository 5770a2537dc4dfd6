"""convert and calibrate: the two commands that write sparse model directories."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from densesparse import __version__
from densesparse.arch import activation_name, decoder_layers, resolve_layout
from densesparse.budget import (
    PROBE_BUDGET,
    calibrate_budgets,
    layer_points,
    probe_losses,
    probe_windows,
    reweight,
    set_budget_biases,
)
from densesparse.config import CalibrateConfig, ConfigError, ConvertConfig, distill_steps, distill_targets
from densesparse.data import adds_bos, calibration_windows
from densesparse.distill import distill_biases
from densesparse.errors import DenseSparseError
from densesparse.evaluate import quality_budget
from densesparse.grouping import neuron_order, permute
from densesparse.io import SPEC_VERSION, load, load_dense, load_tokenizer, save_sparse
from densesparse.report import model_card
from densesparse.router import expert_output_norms, fit_router
from densesparse.runtime import apply_budget, install, sparse_mlps
from densesparse.stats import collect

HELDOUT_TOKENS = 1024
QUALITY_TOKENS = 4096  # held-out calibration text on which --max-ppl-increase is checked


def _progress(show: bool):
    if not show:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


class Phases(dict):
    """Wall seconds per conversion phase, summed over layers (recorded in the spec as phase_seconds: where a
    conversion's time goes, on the machine that ran it)."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start

    def record(self) -> dict:
        return {k: round(v, 1) for k, v in self.items()}


def _intermediate_size(model, layout) -> int:
    from densesparse.arch import get_attr

    layer = decoder_layers(model, layout)[0]
    up = getattr(get_attr(layer, layout.container), layout.up)
    rows = up.weight.shape[1] if layout.conv1d else up.weight.shape[0]
    return rows // 2 if layout.fused_gate_up else rows


def _split(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    held = min(HELDOUT_TOKENS, x.shape[0] // 4)
    order = torch.randperm(x.shape[0], generator=generator)
    return x[order[held:]], x[order[:held]]


def _windows(tokenizer, cfg, generator):
    """Calibration windows, provenance, and the held-out windows a quality budget is checked on."""
    quality = cfg.max_ppl_increase is not None
    batches, provenance, heldout = calibration_windows(tokenizer, cfg.data, cfg.calib_tokens, cfg.seq_len, generator,
                                                       QUALITY_TOKENS if quality else 0)
    if quality and not heldout:
        raise ConfigError("--max-ppl-increase needs held-out calibration text and the text is a single window: "
                          "pass more text with --data or a smaller --seq-len")
    return batches, provenance, heldout


def _default_budget(model, tokenizer, spec: dict, cfg, heldout, fallback: float) -> float:
    """--max-ppl-increase picks the default budget on held-out text (recorded in the spec); else `fallback`."""
    if cfg.max_ppl_increase is None:
        return fallback
    spec["quality_target"] = quality_budget(model, heldout, adds_bos(tokenizer), spec["budgets"],
                                            cfg.max_ppl_increase)
    return spec["quality_target"]["mlp_flops"]


def _probed(model, layout, mlps, points, batches, spec: dict, progress):
    """The layers' points with their errors rescaled by the loss probe (where the spec asks for it; specs from
    before the option had none), the factors recorded in the spec."""
    if not spec.get("loss_probe"):
        spec.pop("loss_probe_factors", None)
        spec.pop("loss_probe_at", None)
        return points
    wins = probe_windows(batches)
    task = progress.add_task("loss probe per layer", total=len(mlps)) if progress else None
    factors = probe_losses(model, mlps, points, wins, step=lambda: progress.advance(task) if progress else None,
                           layers=decoder_layers(model, layout))
    spec["loss_probe_factors"] = [round(f, 4) for f in factors]
    spec["loss_probe_at"] = PROBE_BUDGET
    return reweight(points, factors)


def _calibrated_budgets(mlps, points, spec: dict, min_budget: float, bias_correction: bool, phases: Phases):
    """spec["budgets"]: per-layer settings at every grid budget down to min_budget, and their bias corrections."""
    with phases("budgets"):
        spec["budgets"] = calibrate_budgets(points, min_budget)
        if bias_correction:
            set_budget_biases(mlps, points, spec["budgets"])


def _distilled(model, mlps, spec: dict, batches, cfg, generator, phases: Phases, show_progress: bool) -> None:
    """--distill-steps: the chosen budgets' bias corrections refined end to end (distill.py), recorded in the spec."""
    spec.pop("bias_distill", None)  # a recalibration recomputes the biases: an earlier refinement is gone
    steps = distill_steps(cfg, bool(spec.get("bias_correction")))
    targets = distill_targets(cfg)
    if not steps or not targets:
        return
    with phases("bias_distill"), _progress(show_progress) as progress:
        task = progress.add_task("distill biases", total=steps) if progress else None
        kl = distill_biases(model, mlps, spec["budgets"], [w[:cfg.distill_seq_len] for w in batches], targets,
                            steps, generator, per_step=cfg.distill_windows,
                            on_step=lambda: progress.advance(task) if progress else None)
    spec["bias_distill"] = {"steps": steps, "windows_per_step": cfg.distill_windows,
                            "window_tokens": min(cfg.distill_seq_len, cfg.seq_len), "budgets": targets, "kl": kl}


def _fit_layers(mlps, samples, cfg, generator, progress, regroup: bool, refit: bool, spec: dict, phases: Phases):
    """Per layer: group (regroup), gate scale, router (refit) and the dials' trade-off points (with their bias
    corrections, measured on held-out calibration inputs); returns (points, router losses)."""
    task = progress.add_task("group + route layers", total=len(mlps)) if progress else None
    points, losses = [], []
    for mlp, sample in zip(mlps, samples):
        train, held = _split(sample.x, generator)
        if regroup:
            with phases("grouping"):
                permute(mlp, neuron_order(mlp, train, cfg.grouping, generator))
        statistic = spec.get("gate_scale", "mean_abs")  # specs from before the option used mean |up|
        if refit:
            with phases("router"):  # the gate scale comes from the pass that computes the router's targets
                norms = expert_output_norms(mlp, train, gate_scale=statistic)
                losses.append(fit_router(mlp, train, cfg.router_epochs, generator, norms=norms))
        else:
            with phases("gate_scale"):
                mlp.calibrate_gate_scale(train, statistic)
        with phases("trade_off_points"):
            points.append(layer_points(mlp, held, sample.weight, spec["down_skip"], spec["input_skip"],
                                       spec.get("early_decisions", False)))
        if progress:
            progress.advance(task)
    return points, losses


def convert(cfg: ConvertConfig, show_progress: bool = False) -> dict:
    """Slice every FFN of cfg.model into experts, fit routers and thresholds, write cfg.out. Returns the spec."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise DenseSparseError(f"output directory {out} exists and is not a model directory: pick another --out")
    started, phases = time.time(), Phases()
    generator = torch.Generator().manual_seed(cfg.seed)
    with phases("load"):
        model, tokenizer, source = load_dense(cfg.model, cfg.trust_remote_code, cfg.allow_pickle)
    layout = resolve_layout(model)
    d, m = model.config.hidden_size, _intermediate_size(model, layout)
    n_shared = cfg.shared_experts * cfg.expert_size
    if (m - n_shared) % cfg.expert_size or m - n_shared < cfg.expert_size:
        raise ConfigError(f"intermediate size {m} minus {n_shared} shared neurons is not a positive multiple of "
                          f"--expert-size {cfg.expert_size}: pick an expert size that divides it")
    batches, provenance, heldout = _windows(tokenizer, cfg, generator)
    spec = {
        "version": SPEC_VERSION, "tool_version": __version__, "base_class": type(model).__name__,
        "layout": layout.to_dict(), "activation": activation_name(model.config, layout), "hidden_size": d,
        "intermediate_size": m, "n_shared": n_shared, "expert_size": cfg.expert_size,
        "n_experts": (m - n_shared) // cfg.expert_size, "router_width": cfg.router_width,
        "grouping": cfg.grouping, "down_skip": cfg.down_skip, "input_skip": cfg.input_skip,
        "early_decisions": cfg.early_decisions and cfg.input_skip, "gate_scale": cfg.gate_scale,
        "loss_probe": cfg.loss_probe, "seed": cfg.seed,
        "calibration": provenance,
        "default_mlp_flops": cfg.mlp_flops, "source_model": str(cfg.model or source),
    }
    with _progress(show_progress) as progress:
        with phases("calibration_forward"):
            samples = collect(model, layout, batches, progress, sensitivity=not cfg.loss_probe)
        mlps = install(model, spec)
        points, losses = _fit_layers(mlps, samples, cfg, generator, progress, regroup=True, refit=True,
                                     spec=spec, phases=phases)
        with phases("loss_probe"):
            points = _probed(model, layout, mlps, points, batches, spec, progress)
    spec["bias_correction"] = cfg.bias_correction
    _calibrated_budgets(mlps, points, spec, cfg.min_budget, cfg.bias_correction, phases)
    _distilled(model, mlps, spec, batches, cfg, generator, phases, show_progress)
    spec["router_kl"] = [round(v, 5) for v in losses]
    with phases("quality_budget"):
        spec["default_mlp_flops"] = _default_budget(model, tokenizer, spec, cfg, heldout, cfg.mlp_flops)
    apply_budget(mlps, spec["budgets"], spec["default_mlp_flops"])
    spec["seconds"] = round(time.time() - started, 1)  # everything but writing the directory
    spec["phase_seconds"] = phases.record()
    recipe = {"command": "convert", "config": cfg.to_dict(), "tool_version": __version__}
    save_sparse(model, tokenizer, spec, recipe, out, model_card(spec, recipe))
    return spec


def calibrate(cfg: CalibrateConfig, show_progress: bool = False) -> dict:
    """Refit routers and thresholds of an existing sparse directory on new text or budget, without re-slicing."""
    cfg.validate()
    started, phases = time.time(), Phases()
    directory = Path(cfg.sparse_dir)
    with phases("load"):
        model = load(directory, mlp_flops=1.0)
    tokenizer = load_tokenizer(directory)
    spec = model.config.densesparse
    if cfg.distill_steps and not spec.get("bias_correction"):
        raise ConfigError(f"--distill-steps refines the bias corrections and {directory} has none: convert it again "
                          "without --no-bias-correction")
    layout = resolve_layout(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches, provenance, heldout = _windows(tokenizer, cfg, generator)
    mlps = sparse_mlps(model)
    with _progress(show_progress) as progress:
        with phases("calibration_forward"):
            samples = collect(model, layout, batches, progress, sensitivity=not spec.get("loss_probe"))
        points, losses = _fit_layers(mlps, samples, cfg, generator, progress, regroup=False,
                                     refit=cfg.refit_routers, spec=spec, phases=phases)
        with phases("loss_probe"):
            points = _probed(model, layout, mlps, points, batches, spec, progress)
    # the new budgets' biases (the grid may have changed with --min-budget)
    _calibrated_budgets(mlps, points, spec, cfg.min_budget, bool(spec.get("bias_correction")), phases)
    _distilled(model, mlps, spec, batches, cfg, generator, phases, show_progress)
    if losses:
        spec["router_kl"] = [round(v, 5) for v in losses]
    spec.pop("quality_target", None)
    with phases("quality_budget"):
        spec["default_mlp_flops"] = _default_budget(model, tokenizer, spec, cfg, heldout,
                                                    cfg.mlp_flops or spec["default_mlp_flops"])
    spec["calibration"] = provenance
    spec["seed"] = cfg.seed
    spec["seconds"] = round(time.time() - started, 1)
    spec["phase_seconds"] = phases.record()
    recipe_file = directory / "densesparse_recipe.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    recipe.setdefault("history", []).append({"command": "calibrate", "config": vars(cfg).copy()})
    save_sparse(model, tokenizer, spec, recipe, directory, model_card(spec, recipe))
    return spec
