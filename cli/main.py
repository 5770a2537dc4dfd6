"""The densesparse command line: parse flags (generated from the config dataclasses), call the library, render."""
from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from densesparse import __version__
from densesparse.config import CalibrateConfig, ConvertConfig, EvalConfig
from densesparse.errors import DenseSparseError

app = typer.Typer(help="Turn a dense transformer LM into a sparse-inference model: neuron-group experts, threshold "
                       "routers, FLOPs budgets.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True, soft_wrap=True)
out = Console()


def _option_type(tp):
    return {"str | None": Optional[str], "int | None": Optional[int], "float | None": Optional[float],
            "list[str] | None": Optional[list[str]], "str": str, "int": int, "float": float, "bool": bool}[tp]


def from_config(cls, positional: tuple[str, ...] = ()):
    """Decorator: the command's flags are the fields of `cls` (help, defaults, names); the function gets a `cls`."""
    def wrap(fn):
        params = []
        for f in dataclasses.fields(cls):
            tp = _option_type(f.type)
            helptext = f.metadata.get("help", "")
            if f.name in positional:
                required = f.default is dataclasses.MISSING
                default = typer.Argument(... if required else f.default, help=helptext, show_default=False)
            else:
                flag = "--" + f.name.replace("_", "-")
                names = [f"{flag}/--no-{f.name.replace('_', '-')}"] if tp is bool else [flag]
                default = typer.Option(f.default, *names, help=helptext)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=tp))

        def command(**kwargs):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", UserWarning)
                    result = fn(cls(**kwargs))
                for w in caught:
                    if w.category is UserWarning and "densesparse" in str(w.filename):
                        console.print(f"[yellow]warning:[/] {w.message}")
                return result
            except DenseSparseError as exc:
                console.print(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print("[red]interrupted[/]: nothing was written")
                raise typer.Exit(130) from None

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        return command
    return wrap


@app.command("convert")
@from_config(ConvertConfig, positional=("model",))
def convert_cmd(cfg: ConvertConfig):
    """Slice every FFN of MODEL into experts, fit threshold routers and per-budget thresholds, save a sparse model."""
    from densesparse.pipeline import convert

    spec = convert(cfg, show_progress=True)
    out.print(f"wrote [bold]{cfg.out}[/]: {spec['n_experts']} experts x {spec['expert_size']} neurons per layer "
              f"(+{spec['n_shared']} shared), {len(spec['budgets'])} calibrated budgets, "
              f"default mlp_flops={spec['default_mlp_flops']}{_quality_note(spec)}, {spec['seconds']} s")


def _quality_note(spec: dict) -> str:
    q = spec.get("quality_target")
    return f" (PPL within +{q['max_ppl_increase']:.0%} of dense on held-out text)" if q else ""


@app.command("calibrate")
@from_config(CalibrateConfig, positional=("sparse_dir",))
def calibrate_cmd(cfg: CalibrateConfig):
    """Refit the routers and thresholds of SPARSE_DIR on other text or for another budget, without re-slicing."""
    from densesparse.pipeline import calibrate

    spec = calibrate(cfg, show_progress=True)
    out.print(f"recalibrated [bold]{cfg.sparse_dir}[/] on {spec['calibration']['tokens']} tokens, "
              f"default mlp_flops={spec['default_mlp_flops']}{_quality_note(spec)}, {spec['seconds']} s")


@app.command("eval")
@from_config(EvalConfig, positional=("model",))
def eval_cmd(cfg: EvalConfig):
    """Perplexity and FLOPs (MLP and total, dense vs sparse) at each budget of --sweep; table, JSON and plot."""
    from rich.progress import Progress

    from densesparse.evaluate import evaluate
    from densesparse.report import budget_table, plot_report, record_in_card, write_json

    budgets = cfg.budgets()
    with Progress(console=console, transient=True) as progress:
        report = evaluate(cfg.model, cfg.data, budgets, cfg.max_tokens, cfg.seq_len, progress, cfg.device)
    out.print(budget_table(report))
    record_in_card(cfg.model, report)
    plot = cfg.plot or (str(Path(cfg.json).with_suffix(".png")) if cfg.json else None)
    if cfg.json:
        out.print(f"JSON report: {write_json(report, cfg.json)}")
    if plot:
        out.print(f"plot: {plot_report(report, plot)}")


@app.command("version")
def version_cmd():
    """Print the version."""
    out.print(__version__)


def main():
    sys.exit(app())
