"""The sequence tasks' defaults, per task and method: the settings behind the README's RNN results.

One table, read by SequenceConfig.resolve for every field the user left unset (None). Each row is the
configuration of a reported result, so that `synthgrad train --task T --method M` reproduces it;
tests/test_reported.py checks the table against benchmarks/results/reported.json, which records the
settings of those results, so neither can drift from the other silently.

Truncation is not here: it is what the experiments vary (like the number of stages of a classifier),
and one default, T = 5, serves every task. The charlm result compares DNI at T = 5 with BPTT at T = 8, so
`--method bptt` needs `--truncation 8` for that row; a per-method truncation would make the plain
commands compare the two methods at different T, which no other result does.
"""

from __future__ import annotations

TRUNCATION = 5

# The LSTM and its optimizer for Copy and Repeat Copy: 20,000 batches of 32 sequences. BPTT stops improving
# long before that (truncation, not training time, limits it); DNI needs them to reach 2x BPTT's length
# (rnn-notes.md: with 10,000 batches DNI reached 3.67 at T = 5 against BPTT's 2).
COPY = {"hidden": 128, "batch_size": 32, "lr": 3e-3, "max_steps": 20_000, "clip": 1.0, "schedule": "constant"}

# Charlm (tinyshakespeare): 40,000 windows with a cosine decay, and a looser clip (5) that lets the auxiliary
# task's large MSE x 100 through. With 20,000 windows DNI at T = 5 ends 0.004 BPC behind BPTT at T = 8.
CHARLM = {"hidden": 256, "batch_size": 32, "lr": 3e-3, "max_steps": 40_000, "clip": 5.0, "schedule": "cosine"}

# The synthesizer through time: linear on [h, c] (it fitted the bootstrapped targets better than 2 x 256),
# its synthetic gradient scaled by 0.1 and ramped up over 500 windows (without both, charlm at T = 8 diverged:
# the state grew along the young linear prediction). BPTT records these too; it never builds a synthesizer.
SYNTHESIZER = {"synth_lr": 1e-3, "synth_hidden": 0, "synth_width": 256, "synth_scale": 0.1, "synth_warmup": 500,
               "aux_weight": 0.0}

SEQUENCE_DEFAULTS: dict[tuple[str, str], dict] = {
    ("copy", "bptt"): {**COPY, **SYNTHESIZER},
    # synth_discount 1: the bootstrapped target holds the next window's synthetic gradient undiscounted (the
    # paper's target), so the synthesizer learns the whole future while the core applies 0.1 of it. With the
    # discount at the scale (0.1), DNI at T = 3 stayed at length 2, as BPTT.
    ("copy", "dni"): {**COPY, **SYNTHESIZER, "synth_discount": 1.0},
    ("repeat-copy", "bptt"): {**COPY, **SYNTHESIZER},
    ("repeat-copy", "dni"): {**COPY, **SYNTHESIZER, "synth_discount": 1.0},
    ("charlm", "bptt"): {**CHARLM, **SYNTHESIZER},
    # DNI + Aux (weight 100) with the synthetic gradient x 0.3. No synth_discount: it follows the scale (here
    # 0.3), as in the reported row (a discount of 1 moved seed 0 by 0.002 BPC, less than seeds do).
    ("charlm", "dni"): {**CHARLM, **SYNTHESIZER, "synth_scale": 0.3, "aux_weight": 100.0},
}


def sequence_defaults(task: str, method: str) -> dict:
    """The defaults of `task` trained with `method` (a copy: callers may change it)."""
    return dict(SEQUENCE_DEFAULTS[(task, method)])
