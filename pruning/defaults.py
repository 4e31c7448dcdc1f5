"""Defaults that the command line shows in its help: plain values, no torch.

``ccied submit --help`` and ``ccied peer --help`` name these; importing them
from the modules that use them would load torch (seconds) to print a page of
text. Each is defined here once and imported where it is used.
"""

from __future__ import annotations

DEFAULT_MODEL = "efficientnet_lite0"
# The smallest output of EfficientNet-Lite0 is 192 x 7 x 7 (37.6 KB as float32),
# first reached after block 11 (69% of the compute; blocks 12-14 keep the shape
# and only add head compute). The planner (transfer-layer issue) will choose.
DEFAULT_SPLIT = "blocks.11"
# The model-stage key, looked up when the thumbnail is inconclusive. blocks.4
# (29.5% of the compute, on the way to every built-in split but the JPEG) did
# as well as blocks.11 (69%) in `ccied bench cache`: 0.26 against 0.08 of the
# clips' second halves, 0.33 against 0.26 of the pans' second pass, every hit
# agreeing (2026-11-30). A hit at blocks.11 saved only the last 31%.
DEFAULT_CACHE_SPLIT = "blocks.4"
# The least measured agreement with the unpruned model a variant needs to be
# sent for a latency-first frame (ccied.peer.policy), on the decisive frames
# (the unpruned top-1 probability >= 0.5: answers a user acts on)...
DEFAULT_FIDELITY_FLOOR = 0.98
# A frame is "decisive" when the unpruned model's top-1 probability reaches this:
# the answers a user acts on. Fidelity is measured on those and on all frames.
DECISIVE_PROBABILITY = 0.5
# ...and on all frames, where the model's unsure answers flip at any loss: a
# second, lower floor (DESIGN.md's faithful run: >= 0.95 on all frames).
DEFAULT_FIDELITY_FLOOR_ALL = 0.95
# `ccied prepare --recover` (ccied.pruning.recover). Its operating point when
# --keep-ratio and --bits are not given: 96 of blocks.11's 192 channels at 2 bits,
# measured at 26x fewer bytes than float32 with the decisive answers kept (README,
# "Recovered transfer layer"; 4 bits at fewer channels did worse at equal bytes).
RECOVER_KEEP_RATIO = 0.5
RECOVER_BITS = 2
# Training: 300 steps of 64 tensors took about 4 minutes on 2 cores (README).
RECOVER_STEPS = 300
RECOVER_AUGMENTATIONS = 4
# Every augmented copy's activations stay in memory: 2,000 frames x 17 copies at
# EfficientNet's blocks.11 is 1.3 GB.
RECOVER_MAX_AUGMENTATIONS = 16
RECOVER_LEARNING_RATE = 2e-3
