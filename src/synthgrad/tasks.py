"""Sequence tasks: Copy and Repeat Copy (Graves et al. 2014) with a length curriculum, and character-level LM."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from synthgrad.errors import DataError

BITS = 8  # width of the random binary vectors, as in Graves et al. 2014
# Recorded as extra["repeat_code"] in a Repeat Copy run's config; runs without it coded R as R / max_repeats.
REPEAT_CODE = "standardised"


def has_old_repeat_code(task: str, extra: dict) -> bool:
    """True for a Repeat Copy run from before 2026-11-27, whose repeat channel held R / max_repeats."""
    return task == "repeat-copy" and extra.get("repeat_code") != REPEAT_CODE


@dataclass
class Episode:
    """One batch of copy-task sequences, time-major."""

    x: torch.Tensor  # [L, B, input_size]
    target: torch.Tensor  # [L, B, output_size], 0/1
    mask: torch.Tensor  # [L, 1, 1], 1 on the output phase (where the loss is taken)


class CopyTask:
    """Copy (repeat=False) or Repeat Copy (repeat=True) of N random binary vectors.

    Copy, length N: N vectors of BITS bits, then a delimiter step (its own input channel),
    then N blank steps during which the model must output the N vectors: 2N + 1 steps.
    Repeat Copy, length N: the delimiter step also carries the repeat count R on an extra
    channel (R uniform in 1..max_repeats, one per batch), normalised to mean zero and variance
    one over that range as in Graves et al. 2014; the model outputs the N vectors R times, then
    an end marker on an extra output channel: N + N*R + 2 steps.
    The length reported and raised by the curriculum is N.
    """

    def __init__(self, repeat: bool = False, max_repeats: int = 3, bits: int = BITS):
        self.repeat, self.max_repeats, self.bits = repeat, max_repeats, bits
        self.name = "repeat-copy" if repeat else "copy"
        self.input_size = bits + (2 if repeat else 1)  # bits, delimiter[, repeat count]
        self.output_size = bits + (1 if repeat else 0)  # bits[, end marker]

    def repeat_code(self, reps: int) -> float:
        """The repeat channel's value for R repeats: R standardised over R uniform in 1..max_repeats.

        For max_repeats = 3 the codes are -1.22, 0 and 1.22. (Before 2026-11-27 the channel held
        R / max_repeats, codes 0.33 to 1 that differ by a third, which the models that got stuck ignored.)
        """
        mean, var = (self.max_repeats + 1) / 2, (self.max_repeats ** 2 - 1) / 12
        return (reps - mean) / math.sqrt(var) if var > 0 else 0.0

    def sample(self, length: int, batch: int, generator: torch.Generator | None = None) -> Episode:
        seq = torch.randint(0, 2, (length, batch, self.bits), generator=generator).float()  # [N, B, BITS]
        reps = int(torch.randint(1, self.max_repeats + 1, (1,), generator=generator)) if self.repeat else 1
        return self.episode(seq, reps)

    def episode(self, seq: torch.Tensor, reps: int = 1) -> Episode:
        """The episode that copies `seq` [N, B, BITS] `reps` times (Repeat Copy) or once (Copy)."""
        n, b = seq.shape[0], seq.shape[1]
        out_len = n * reps + (1 if self.repeat else 0)
        total = n + 1 + out_len
        x = torch.zeros(total, b, self.input_size)
        x[:n, :, :self.bits] = seq
        x[n, :, self.bits] = 1.0  # delimiter
        if self.repeat:
            x[n, :, self.bits + 1] = self.repeat_code(reps)
        target = torch.zeros(total, b, self.output_size)
        target[n + 1:n + 1 + n * reps, :, :self.bits] = seq.repeat(reps, 1, 1)
        if self.repeat:
            target[-1, :, self.bits] = 1.0  # end marker
        mask = torch.zeros(total, 1, 1)
        mask[n + 1:] = 1.0
        return Episode(x, target, mask)


def copy_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bitwise BCE on the output phase, summed over steps and bits, mean over the batch (nats per sequence)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # [T, B, O]
    return (bce * mask).sum() / logits.shape[1]


def bit_errors(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean number of wrongly predicted bits per sequence on the output phase (threshold 0.5)."""
    wrong = ((logits > 0).float() != target).float() * mask  # [L, B, O]
    return wrong.sum().item() / logits.shape[1]


class Curriculum:
    """Raises the sequence length once the current one is solved.

    Solved: the mean bit error per sequence over the last `window` batches at this length is
    below `threshold` (Graves et al. 2014 / the DNI paper use 0.15 bits). `solved` is the
    longest length solved so far (start - 1 before any).
    """

    def __init__(self, start: int = 1, threshold: float = 0.15, window: int = 20, max_length: int | None = None):
        self.length, self.threshold, self.window, self.max_length = start, threshold, window, max_length
        self.solved = start - 1
        self.errors: deque[float] = deque(maxlen=window)

    def record(self, bit_error: float) -> bool:
        """Add one batch's bit error per sequence; True when this solved the current length."""
        self.errors.append(bit_error)
        if len(self.errors) < self.window or sum(self.errors) / len(self.errors) >= self.threshold:
            return False
        self.solved = max(self.solved, self.length)
        if self.max_length is None or self.length < self.max_length:
            self.length += 1
        self.errors.clear()
        return True

    def recent_error(self) -> float | None:
        return sum(self.errors) / len(self.errors) if self.errors else None

    def state_dict(self) -> dict:
        return {"length": self.length, "solved": self.solved, "errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.solved = state["length"], state["solved"]
        self.errors = deque(state["errors"], maxlen=self.window)


def char_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over steps, mean over the batch; logits [T, B, V], target [T, B]."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / logits.shape[1]


class CharCorpus:
    """A text file as characters: vocabulary of the whole file, the last `holdout` fraction held out."""

    def __init__(self, text: str, holdout: float = 0.1, source: str = "<text>"):
        if len(text) < 100:
            raise DataError(f"{source} holds {len(text)} characters; give a text file of at least 100")
        self.source = source
        self.vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.vocab)}
        data = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        split = int(len(data) * (1 - holdout))
        self.train, self.valid = data[:split], data[split:]

    @classmethod
    def from_file(cls, path: str | Path, holdout: float = 0.1) -> CharCorpus:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"--text {path}: no such file; give a plain-text file for the charlm task")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--text {path} is not UTF-8 text ({e}); convert it, e.g. with iconv") from e
        return cls(text, holdout, str(path))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def streams(data: torch.Tensor, batch: int) -> torch.Tensor:
    """Cut a 1-D token tensor into `batch` contiguous streams, time-major [N // batch, batch]."""
    n = len(data) // batch
    if n < 2:
        raise DataError(f"{len(data)} characters cannot make {batch} streams of 2 or more; lower --batch-size "
                        "or give a longer --text")
    return data[:n * batch].view(batch, n).t().contiguous()


@torch.no_grad()
def evaluate_bpc(model: torch.nn.Module, data: torch.Tensor, batch: int = 16, chunk: int = 256,
                 max_chars: int | None = None) -> float:
    """Bits per character of `model` on `data`, read as `batch` streams with the state carried across chunks."""
    was = model.training
    model.eval()
    if max_chars is not None:
        data = data[:max_chars]
    s = streams(data, min(batch, max(1, len(data) // 2)))  # [N, b]
    state, total, count = None, 0.0, 0
    for t in range(0, s.shape[0] - 1, chunk):
        end = min(t + chunk, s.shape[0] - 1)
        logits, state = model(s[t:end], state)
        total += F.cross_entropy(logits.flatten(0, 1), s[t + 1:end + 1].flatten(), reduction="sum").item()
        count += (end - t) * s.shape[1]
    model.train(was)
    return total / count / math.log(2)
