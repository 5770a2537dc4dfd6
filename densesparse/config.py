"""One config object per command: the single source of the CLI flags, the saved recipe and the Python API."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field

from densesparse.errors import DenseSparseError

GROUPINGS = ("coactivation", "weights", "contiguous")
GATE_SCALES = ("rms", "mean_abs")
DEFAULT_SWEEP = (1.0, 0.75, 0.5, 0.35, 0.25)
QUALITY_HELP = ("Quality budget instead of --mlp-flops: the default becomes the smallest calibrated budget whose "
                "perplexity on held-out calibration text is at most (1 + this) x dense, e.g. 0.05.")


def _check_quality(value: float | None) -> None:
    if value is not None and not 0.0 < value <= 10.0:
        raise ConfigError(f"--max-ppl-increase {value} is outside (0, 10]: give a fraction, e.g. 0.05 for 5%")


DISTILL_STEPS = 10
DISTILL_HELP = ("Refine the bias corrections of the --distill-budgets end to end: this many Adam steps, each on "
                "--distill-windows calibration windows (their first --distill-seq-len tokens) for every budget, on "
                "the KL divergence of the sparse model's next-token distribution from the dense model's (about 17 s "
                "a step of one 512-token window and three budgets for SmolLM2 on a 2-core AVX2 CPU); 0 = off. "
                f"Default: {DISTILL_STEPS} where the model has bias corrections, else 0.")
DISTILL_WINDOWS_HELP = "Calibration windows per --distill-steps step."
DISTILL_SEQ_LEN_HELP = ("Tokens of each calibration window that a --distill-steps step runs (its first ones; at most "
                        "--seq-len): shorter windows make a step cheaper.")
DISTILL_BUDGETS = (0.5, 0.35, 0.25)
DISTILL_BUDGETS_HELP = ("Comma-separated calibrated budgets whose bias corrections --distill-steps refines; budgets "
                        "between two calibrated ones interpolate their biases as before. Default: "
                        f"{','.join(map(str, DISTILL_BUDGETS))}, those of them that --min-budget calibrates.")


def distill_steps(cfg, bias_correction: bool) -> int:
    """The refinement steps a convert or calibrate config asks for (--distill-steps, or its default)."""
    if cfg.distill_steps is not None:
        return cfg.distill_steps
    return DISTILL_STEPS if bias_correction else 0


def distill_targets(cfg) -> list[float]:
    """The budgets a convert or calibrate config refines, largest first: --distill-budgets (each one a calibrated
    budget), or the defaults that the grid calibrates."""
    from densesparse.budget import budget_grid, same_budget  # lazy: numpy and torch, not for --help

    grid = budget_grid(cfg.min_budget)

    def on_grid(t: float) -> bool:
        return any(same_budget(t, g) for g in grid)

    if cfg.distill_budgets is None:
        return [t for t in DISTILL_BUDGETS if on_grid(t)]
    value = cfg.distill_budgets
    try:
        targets = sorted({float(v) for v in value.split(",") if v.strip()}, reverse=True)
    except ValueError:
        raise ConfigError(f"--distill-budgets {value!r} must be comma-separated numbers in (0, 1)") from None
    if not targets or any(not 0.0 < t < 1.0 for t in targets):
        raise ConfigError(f"--distill-budgets {value!r}: every budget must be in (0, 1), e.g. 0.5,0.35,0.25")
    missing = [t for t in targets if not on_grid(t)]
    if missing:
        raise ConfigError(f"--distill-budgets {', '.join(map(str, missing))} not among the calibrated budgets "
                          f"({', '.join(f'{g:g}' for g in grid)}): pick from those or change --min-budget")
    return targets


def _check_distill(cfg) -> None:
    if cfg.distill_steps is not None and cfg.distill_steps < 0:
        raise ConfigError(f"--distill-steps {cfg.distill_steps} must be 0 (off) or a positive number of steps")
    if cfg.distill_windows < 1:
        raise ConfigError(f"--distill-windows {cfg.distill_windows} must be at least 1")
    if cfg.distill_seq_len < 2:
        raise ConfigError(f"--distill-seq-len {cfg.distill_seq_len} must be at least 2 tokens")
    if cfg.distill_steps != 0:
        distill_targets(cfg)


def opt(default, help: str, flag: str | None = None):
    """A config field that also describes its CLI option."""
    return field(default=default, metadata={"help": help, "flag": flag})


class ConfigError(DenseSparseError):
    pass


@dataclass
class ConvertConfig:
    model: str | None = opt(None, "Hugging Face model directory (safetensors) or .gguf file; default: the "
                                  "embedded SmolLM2-135M-Instruct.")
    out: str = opt("sparse", "Output directory of the sparse model.")
    data: list[str] | None = opt(None, "Calibration text files (repeatable); default: the shipped calibration/ corpus.")
    calib_tokens: int = opt(32768, "Calibration tokens to run through the dense model.")
    seq_len: int = opt(512, "Calibration window length in tokens.")
    grouping: str = opt("coactivation", "Neuron grouping: coactivation | weights | contiguous.")
    expert_size: int = opt(8, "Neurons per expert.")
    shared_experts: int = opt(0, "Always-on experts made of the most often active neurons (CMoE/DeepSeekMoE).")
    router_width: int = opt(64, "Hidden width of each layer's 2-layer router.")
    router_epochs: int = opt(6, "Router training epochs over the calibration tokens.")
    down_skip: bool = opt(True, "Also skip down-projection rows whose activation is tiny inside chosen experts "
                                "(exact, no prediction).")
    input_skip: bool = opt(True, "Also let gate/up skip input channels whose |x| is tiny (TEAL-style, exact given x); "
                                 "the budget search decides per layer how much. It saves FLOPs, not GPU time (gate "
                                 "and up rows are read whole): for GPU inference use --no-input-skip.")
    early_decisions: bool = opt(True, "Let the gate dial and the down skip judge each neuron on partial sums over "
                                      "the larger input channels, so a neuron they drop costs only those (the kept "
                                      "ones are completed; the budget search decides per layer). Like input skip it "
                                      "saves FLOPs, not GPU time: --no-input-skip turns it off too.")
    gate_scale: str = opt("rms", "Gated FFNs: the gate dial scores a neuron |act(gate)| x this statistic of its up "
                                 "x ||down row||: rms = sqrt(E[up^2]) (its expected squared output, the error the "
                                 "budget search minimises) | mean_abs = E|up| (what conversions used before this "
                                 "option).")
    loss_probe: bool = opt(True, "Weigh each layer's output errors by the loss the model really shows when that "
                                 "layer alone is sparsified (one probe forward per layer on calibration text); off: "
                                 "by a gradient estimate (backward passes on calibration text).")
    bias_correction: bool = opt(True, "Add back, per layer and calibrated budget, the mean MLP output error measured "
                                      "on held-out calibration tokens, shrunk where it is mostly sampling noise "
                                      "(a bias: free at run time).")
    distill_steps: int | None = opt(None, DISTILL_HELP)
    distill_budgets: str | None = opt(None, DISTILL_BUDGETS_HELP)
    distill_windows: int = opt(1, DISTILL_WINDOWS_HELP)
    distill_seq_len: int = opt(512, DISTILL_SEQ_LEN_HELP)
    mlp_flops: float = opt(0.5, "Default MLP FLOPs budget the model loads with (fraction of dense, router included).")
    max_ppl_increase: float | None = opt(None, QUALITY_HELP)
    min_budget: float = opt(0.1, "Smallest budget to calibrate thresholds for.")
    seed: int = opt(0, "Seed of every random choice (torch.Generator, recorded in the output).")
    trust_remote_code: bool = opt(False, "Allow the source model's own remote code (off by default).")
    allow_pickle: bool = opt(False, "Allow loading a pickle-only (.bin) checkpoint (unsafe; off by default).")

    def validate(self) -> "ConvertConfig":
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"--grouping {self.grouping!r} is unknown: choose one of {', '.join(GROUPINGS)}")
        if self.gate_scale not in GATE_SCALES:
            raise ConfigError(f"--gate-scale {self.gate_scale!r} is unknown: choose one of {', '.join(GATE_SCALES)}")
        if self.expert_size < 1:
            raise ConfigError(f"--expert-size {self.expert_size} must be a positive number of neurons")
        for name in ("mlp_flops", "min_budget"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {v} is outside (0, 1]: give a fraction of the "
                                  "dense MLP FLOPs, e.g. 0.5")
        if self.calib_tokens < 256 or self.seq_len < 16:
            raise ConfigError("--calib-tokens must be at least 256 and --seq-len at least 16")
        _check_quality(self.max_ppl_increase)
        _check_distill(self)
        if self.distill_steps and not self.bias_correction:
            raise ConfigError("--distill-steps refines the bias corrections: drop --no-bias-correction")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrateConfig:
    sparse_dir: str = opt(MISSING, "Sparse model directory written by `densesparse convert`.")
    data: list[str] | None = opt(None, "Calibration text files; default: the shipped calibration/ corpus.")
    calib_tokens: int = opt(32768, "Calibration tokens.")
    seq_len: int = opt(512, "Calibration window length in tokens.")
    router_epochs: int = opt(6, "Router training epochs.")
    refit_routers: bool = opt(True, "Refit the routers (else only the thresholds).")
    mlp_flops: float | None = opt(None, "New default MLP FLOPs budget (default: keep the saved one).")
    max_ppl_increase: float | None = opt(None, QUALITY_HELP)
    min_budget: float = opt(0.1, "Smallest budget to calibrate thresholds for.")
    distill_steps: int | None = opt(None, DISTILL_HELP)
    distill_budgets: str | None = opt(None, DISTILL_BUDGETS_HELP)
    distill_windows: int = opt(1, DISTILL_WINDOWS_HELP)
    distill_seq_len: int = opt(512, DISTILL_SEQ_LEN_HELP)
    seed: int = opt(0, "Seed (recorded in the output).")

    def validate(self) -> "CalibrateConfig":
        for name in ("mlp_flops", "min_budget"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {v} is outside (0, 1]: give a fraction, e.g. 0.5")
        _check_quality(self.max_ppl_increase)
        _check_distill(self)
        return self


@dataclass
class EvalConfig:
    model: str = opt(MISSING, "Sparse model directory (or a dense model, which is evaluated dense).")
    data: list[str] | None = opt(None, "Evaluation text files; default: the shipped calibration/ corpus "
                                       "(better: your own held-out text).")
    sweep: str = opt(",".join(str(x) for x in DEFAULT_SWEEP), "Comma-separated MLP FLOPs budgets to evaluate.")
    max_tokens: int | None = opt(None, "Evaluate at most this many tokens.")
    seq_len: int = opt(1024, "Evaluation window length in tokens.")
    json: str | None = opt(None, "Write the report as JSON here.")
    plot: str | None = opt(None, "Write the PPL-vs-FLOPs plot (PNG) here; default: next to --json.")
    device: str = opt("cpu", "cpu (float32, the reference) or cuda (bfloat16, Triton kernels; tokens/s reported).")

    def budgets(self) -> list[float]:
        try:
            values = [float(v) for v in self.sweep.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sweep {self.sweep!r} must be comma-separated numbers in (0, 1]") from None
        if not values or any(not 0.0 < v <= 1.0 for v in values):
            raise ConfigError(f"--sweep {self.sweep!r}: every budget must be in (0, 1], e.g. 1,0.5,0.25")
        return values

