"""Phases of a rank's life; the hang timeouts in the run config are set per phase."""

from enum import Enum


class Phase(str, Enum):
    STARTUP = "startup"
    STEP = "step"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
