"""Text in, token windows out."""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch

from densesparse.errors import DenseSparseError


def _calibration_dir() -> Path:
    """The shipped corpus: installed as the package `densesparse.calibration`, or the repo's calibration/ folder."""
    spec = importlib.util.find_spec("densesparse.calibration")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "calibration"


CALIBRATION_DIR = _calibration_dir()


def default_corpus() -> list[Path]:
    files = sorted(CALIBRATION_DIR.glob("*.txt"))
    if not files:
        raise DenseSparseError(f"the default calibration corpus is missing from {CALIBRATION_DIR}: "
                               "reinstall densesparse or pass --data FILE")
    return files


def read_text(paths: list[str] | None) -> tuple[str, list[str]]:
    """The concatenated text of `paths` (default corpus when None) and the list of files read."""
    files = [Path(p) for p in paths] if paths else default_corpus()
    parts = []
    for f in files:
        if not f.is_file():
            raise DenseSparseError(f"text file not found: {f}: pass an existing UTF-8 text file with --data")
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DenseSparseError(f"{f} is not UTF-8 text: convert it or pass another file with --data") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise DenseSparseError(f"the text in {', '.join(map(str, files))} is empty: pass a file with real text")
    return text, [str(f) for f in files]


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, bos: int | None = None,
            min_tokens: int = 2) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens (the last partial window kept if long enough), BOS prepended
    when the tokenizer adds one by default (the BOS position is not scored)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < min_tokens:
        raise DenseSparseError(f"the text has only {ids.numel()} tokens: give at least {min_tokens}")
    chunks = list(ids.split(seq_len))
    if len(chunks) > 1 and chunks[-1].numel() < seq_len:
        chunks = chunks[:-1]
    out = [torch.cat([torch.tensor([bos]), c]) if bos is not None else c for c in chunks]
    return out


def calibration_windows(tokenizer, paths, tokens: int, seq_len: int, generator: torch.Generator,
                        heldout_tokens: int = 0):
    """A seeded sample of calibration windows spread over the whole text, provenance, and `heldout_tokens` of other
    windows of the same text (taken first, from the far end of the shuffled order) for checking quality."""
    text, files = read_text(paths)
    ids = tokenize(tokenizer, text)
    wins = windows(ids, seq_len, bos=tokenizer.bos_token_id if adds_bos(tokenizer) else None, min_tokens=16)
    order = torch.randperm(len(wins), generator=generator).tolist()
    heldout, held = [], 0
    while held < heldout_tokens and len(order) > 1:
        heldout.append(wins[order.pop()])
        held += heldout[-1].numel()
    picked, total = [], 0
    for i in order:
        if total >= tokens:
            break
        picked.append(wins[i])
        total += wins[i].numel()
    if total < tokens:
        warnings.warn(f"calibration text has only {total} tokens (asked for {tokens}); using all of them. "
                      "Pass more text with --data for better routers.", stacklevel=2)
    provenance = {"files": files, "tokens": total, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                  "seq_len": seq_len, "heldout_tokens": held}
    return picked, provenance, heldout
