"""What the ResNet-50 A/B scripts share: their command line ([batch=4] [rounds] [mask_ratio=0.6]), the
inputs (random images, one random patch mask) and the interleaved timing loop: every candidate runs once
per round, so this VM's drift and noise hit all of them alike."""
import sys
import time

import torch

from mimsparse.masking import random_patch_mask


def setup(default_rounds: int):
    """(batch, rounds, mask ratio, images [B, 3, 224, 224], visible [B, 7, 7]) from ``sys.argv``."""
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else default_rounds
    ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.6
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    visible = random_patch_mask(batch, (7, 7), ratio, torch.Generator().manual_seed(0))
    return batch, rounds, ratio, images, visible


def interleaved(fns: dict, rounds: int, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns; ``warm_up``: one untimed call
    each first (a caller that timed its own first calls passes False)."""
    for f in fns.values() if warm_up else ():
        f()
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    return times
