"""Training FLOPs of a model counted, not derived: torch's ``FlopCounterMode`` over one forward of a
meta-device copy (no memory, no arithmetic, any size), times 3 (the backward costs about twice the
forward). Used by models whose layer mix (convs, norms, attention at several resolutions) makes a
hand formula error-prone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def training_flops(factory: Callable[[], nn.Module], make_inputs: Callable[[], tuple]) -> float:
    """3x the forward FLOPs of ``factory()(*make_inputs())`` for one sample, both built on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model, inputs = factory(), make_inputs()
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    return 3.0 * counter.get_total_flops()
