"""Calibration data for plan search and overlap: token ids from a tensor, batches, or text files.

    as_batches("docs/", batch_size=8, seq_len=256)      # [B, L] LongTensors
    calibration_from_files(["a.txt", "dir/"], 256, tokenizer=tok)   # [N, 256]

Without a tokenizer, text is read as UTF-8 bytes modulo the model's vocabulary (`byte_tokens`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def byte_tokens(text: str | bytes, vocab_size: int = 256) -> torch.Tensor:
    """Byte-level fallback tokenizer: UTF-8 bytes modulo the vocabulary size."""
    data = text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    return ids % vocab_size


def text_files(paths) -> list[Path]:
    """Files given directly, or every file (recursively, sorted) under given directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"calibration path {p} does not exist")
    return files


def calibration_from_files(paths, seq_len: int = 256, *, tokenizer=None, vocab_size: int = 256,
                           max_sequences: int | None = None) -> torch.LongTensor:
    """Concatenate the files' tokens and cut them into rows of `seq_len` -> LongTensor [N, seq_len].

    `tokenizer`: an HF tokenizer (anything with `.encode(text)`) or a callable text -> ids; without one,
    bytes % vocab_size."""
    chunks = []
    for f in text_files(paths):
        if tokenizer is None:
            ids = byte_tokens(f.read_bytes(), vocab_size)
        else:
            encode = getattr(tokenizer, "encode", tokenizer)
            ids = torch.as_tensor(list(encode(f.read_text(encoding="utf-8", errors="replace"))),
                                  dtype=torch.long)
        chunks.append(ids)
        if max_sequences is not None and sum(c.numel() for c in chunks) >= max_sequences * seq_len:
            break
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"empty calibration set: the files hold {ids.numel()} tokens, fewer than one "
                         f"sequence of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def as_batches(calibration, batch_size: int = 8, *, seq_len: int = 256, tokenizer=None,
               vocab_size: int | None = None) -> list[torch.Tensor]:
    """LongTensor [N, L] (split into batches) | iterable of [B, L] / [L] tensors | file/dir path(s)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calibration, (str, os.PathLike)) or (
            isinstance(calibration, (list, tuple)) and calibration
            and all(isinstance(c, (str, os.PathLike)) for c in calibration)):
        calibration = calibration_from_files(calibration, seq_len, tokenizer=tokenizer,
                                             vocab_size=vocab_size or 256)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration[None]
        if calibration.dim() != 2:
            raise ValueError(f"calibration tensor must be token ids [N, L], got shape {tuple(calibration.shape)}")
        batches = list(calibration.split(batch_size))
    else:
        try:
            batches = [b if b.dim() == 2 else b[None] for b in (torch.as_tensor(b) for b in calibration)]
        except TypeError as exc:
            raise ValueError("calibration must be a LongTensor [N, L], an iterable of such batches, or "
                             f"text file path(s); got {type(calibration).__name__}") from exc
    batches = [b for b in batches if b.numel() > 0]
    if not batches:
        raise ValueError("empty calibration set: give at least one sequence of token ids")
    for b in batches:
        if b.dtype not in (torch.int64, torch.int32) or b.dim() != 2:
            raise ValueError(f"calibration batches must be integer token ids [B, L], got {b.dtype} "
                             f"{tuple(b.shape)}")
        if b.shape[1] < 2:
            raise ValueError(f"calibration sequences need >= 2 tokens for next-token loss, got L={b.shape[1]}")
    return [b.long() for b in batches]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batches: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    """The batches on the model's device."""
    device = model_device(model)
    return [b.to(device) for b in batches]


__all__ = ["as_batches", "byte_tokens", "calibration_from_files", "model_device", "text_files", "to_device"]
