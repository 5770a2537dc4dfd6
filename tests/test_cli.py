"""The command line through typer's runner: happy path on a tiny model, and every bad input in one clear line."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from densesparse.cli.main import app
from typer.testing import CliRunner

from densesparse.io import SPEC_VERSION

runner = CliRunner()
FAST = ["--calib-tokens", "600", "--seq-len", "64", "--router-epochs", "2", "--expert-size", "4",
        "--router-width", "16", "--min-budget", "0.3"]


def _fails_cleanly(result, *words):
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    for w in words:
        assert w in text.replace("\n", " "), text


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_model("LlamaForCausalLM").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_no_loss_probe_leaves_the_errors_unprobed(llama_dir, tmp_path):
    out = tmp_path / "sparse"
    r = runner.invoke(app, ["convert", str(llama_dir), "--out", str(out), "--no-loss-probe", *FAST])
    assert r.exit_code == 0, r.output
    spec = json.loads((out / "config.json").read_text())["densesparse"]
    assert not spec["loss_probe"] and "loss_probe_factors" not in spec and "loss_probe_at" not in spec


def test_convert_calibrate_eval(llama_dir, tmp_path):
    out = tmp_path / "sparse"
    r = runner.invoke(app, ["convert", str(llama_dir), "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    spec = json.loads((out / "config.json").read_text())["densesparse"]
    assert spec["seed"] == 0 and spec["calibration"]["tokens"] >= 600 and spec["version"] == SPEC_VERSION
    assert spec["gate_scale"] == "rms" and spec["loss_probe"]
    assert len(spec["loss_probe_factors"]) == 2 and all(f > 0 for f in spec["loss_probe_factors"])
    assert spec["loss_probe_at"] == 0.5
    phases = spec["phase_seconds"]  # where the time went: every phase timed, together within the total
    assert {"load", "calibration_forward", "grouping", "router", "trade_off_points", "loss_probe",
            "budgets"} <= set(phases)  # the gate scale comes from the router's pass, the biases with the points
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= spec["seconds"] + 0.1 * len(phases)
    other = tmp_path / "other.txt"
    other.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    r = runner.invoke(app, ["calibrate", str(out), "--data", str(other), "--mlp-flops", "0.4", "--calib-tokens",
                            "600", "--seq-len", "64", "--router-epochs", "1", "--min-budget", "0.3"])
    assert r.exit_code == 0, r.output
    spec2 = json.loads((out / "config.json").read_text())["densesparse"]
    assert spec2["default_mlp_flops"] == 0.4 and spec2["calibration"]["files"] == [str(other)]
    assert spec2["loss_probe_factors"] != spec["loss_probe_factors"]  # probed again on the new text
    assert "grouping" not in spec2["phase_seconds"] and "router" in spec2["phase_seconds"]  # no re-slicing
    report = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", str(out), "--data", str(other), "--sweep", "1,0.6,0.4", "--max-tokens", "512",
                            "--seq-len", "128", "--json", str(report)])
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert {"model", "data", "tokens", "dense", "budgets"} <= set(rep)
    assert [b["target"] for b in rep["budgets"]] == [1.0, 0.6, 0.4]
    full, *sparse = rep["budgets"]
    assert full["ppl"] == pytest.approx(rep["dense"]["ppl"]) and full["mlp_flops_kept"] == 1.0
    for b in sparse:
        assert {"target", "mlp_flops_kept", "total_flops_kept", "ppl", "experts_per_token"} <= set(b)
        assert 0 < b["mlp_flops_kept"] < 1 and b["total_flops_kept"] > b["mlp_flops_kept"]
    assert report.with_suffix(".png").stat().st_size > 1000
    assert "## Evaluation" in (out / "README.md").read_text()
    for tolerance in ("10", "0.02"):  # a quality budget: the smallest grid budget within PPL <= (1 + x) dense
        r = runner.invoke(app, ["calibrate", str(out), "--data", str(other), "--max-ppl-increase", tolerance,
                                "--calib-tokens", "600", "--seq-len", "64", "--router-epochs", "1",
                                "--min-budget", "0.3"])
        assert r.exit_code == 0, r.output
        spec3 = json.loads((out / "config.json").read_text())["densesparse"]
        q = spec3["quality_target"]
        limit = q["dense_ppl"] * (1 + float(tolerance))
        measured = {m["target"]: m["ppl"] for m in q["measured"]}
        assert spec3["default_mlp_flops"] == q["mlp_flops"] and q["tokens"] > 0 and measured
        assert q["mlp_flops"] == 1.0 or measured[q["mlp_flops"]] <= limit
        assert all(p > limit for t, p in measured.items() if t < q["mlp_flops"])
        if tolerance == "10":
            assert q["mlp_flops"] == min(b["target"] for b in spec3["budgets"])
    r = runner.invoke(app, ["calibrate", str(out), "--max-ppl-increase", "0"])
    assert r.exit_code == 2 and "--max-ppl-increase" in r.output


def test_help_is_documented():
    r = runner.invoke(app, ["convert", "--help"])
    assert r.exit_code == 0 and "--expert-size" in r.output and "--mlp-flops" in r.output


def test_missing_path(tmp_path):
    _fails_cleanly(runner.invoke(app, ["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
                   "not found")
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path):
    (tmp_path / "d").mkdir()
    _fails_cleanly(runner.invoke(app, ["convert", str(tmp_path / "d"), "--out", str(tmp_path / "o")]),
                   "not a model directory")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, tokenizer):
    import transformers as tf

    cfg = tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=256)
    path = tmp_path / "bloom"
    tf.BloomForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    _fails_cleanly(runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "o"), *FAST]),
                   "unsupported architecture BloomForCausalLM")
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(llama_dir, tmp_path):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o")]),
                   "corrupt or truncated safetensors")
    assert not (tmp_path / "o").exists()


def test_pickle_only_refused(llama_dir, tmp_path):
    sd = tiny_model("LlamaForCausalLM").state_dict()
    (llama_dir / "model.safetensors").unlink()
    torch.save(sd, llama_dir / "pytorch_model.bin")
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o")]),
                   "pickle", "--allow-pickle")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_text(llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o"), "--data",
                                       str(empty)]), "empty")
    assert not (tmp_path / "o").exists()


def test_short_calibration_text_warns(llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 30)
    r = runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o"), "--data", str(short), *FAST,
                            "--calib-tokens", "50000"])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "tokens" in r.output


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_budget_out_of_range(llama_dir, tmp_path, budget):
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o"), "--mlp-flops",
                                       budget]), "outside (0, 1]")
    assert not (tmp_path / "o").exists()


def test_unknown_gate_scale(llama_dir, tmp_path):
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o"), "--gate-scale",
                                       "median"]), "--gate-scale")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, says", [(["--distill-steps", "5", "--distill-budgets", "0.33"], "not among"),
                                        (["--distill-steps", "-1"], "--distill-steps"),
                                        (["--distill-steps", "5", "--no-bias-correction"], "bias correction")])
def test_bad_distill_options(llama_dir, tmp_path, args, says):
    _fails_cleanly(runner.invoke(app, ["convert", str(llama_dir), "--out", str(tmp_path / "o"), *args]), says)
    assert not (tmp_path / "o").exists()


def test_eval_sweep_out_of_range(llama_dir, tmp_path):
    _fails_cleanly(runner.invoke(app, ["eval", str(llama_dir), "--sweep", "1,2"]), "(0, 1]")


def test_eval_on_dense_dir_says_convert_first(llama_dir):
    _fails_cleanly(runner.invoke(app, ["eval", str(llama_dir)]), "densesparse convert")


def test_mismatched_safetensors(llama_dir, tmp_path):
    out = tmp_path / "sparse"
    assert runner.invoke(app, ["convert", str(llama_dir), "--out", str(out), *FAST]).exit_code == 0
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "router" not in k}, out / "model.safetensors", metadata={"format": "pt"})
    _fails_cleanly(runner.invoke(app, ["eval", str(out), "--max-tokens", "64"]), "router")


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    from densesparse.io import _gguf_cache

    monkeypatch.setenv("DENSESPARSE_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / d / "m.gguf" for d in "abc")
    for f, data in ((a, b"GGUF same"), (b, b"GGUF same"), (c, b"GGUF other")):
        f.parent.mkdir()
        f.write_bytes(data)
    assert _gguf_cache(a) == _gguf_cache(b)  # a second install of the same file reuses the entry
    assert _gguf_cache(a) != _gguf_cache(c)
    assert _gguf_cache(a).parent == tmp_path / "cache"
