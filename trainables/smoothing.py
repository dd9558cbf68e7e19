"""Randomized smoothing: Cohen, Rosenfeld & Kolter 2019, PREDICT and CERTIFY. (Being written.)"""
from __future__ import annotations

ABSTAIN = -1
#: Cohen et al.'s certification settings, used by both papers; the one place these defaults live.
N0 = 100
N = 100_000
ALPHA = 0.001
