#!/usr/bin/env python
"""torchrun, with the exit status of a job that a signal stopped with a checkpoint: 75, as for one process.

  tools/launch.py --standalone --nproc-per-node 8 tools/pretrain.py --config configs/fcmae_tiny.yaml \\
      --output-dir runs/x --resume auto

Arguments are torchrun's (python -m torch.distributed.run --help). Differences: SIGUSR1 is forwarded to
the workers too (--signals-to-handle still overrides), and the status is 75 when every local worker
stopped with a checkpoint, whether a worker or torchrun itself was signalled (plain torchrun exits 1).
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from mimsparse.train.launch import main

    sys.exit(main())
