"""When a checkpoint within an epoch is due (pretraining's ``train.save_every_steps`` /
``train.save_every_minutes``, finetuning's ``--save-every-steps`` / ``--save-every-minutes``): a kill
without a warning (OOM killer, a lost node) then loses at most that much of the run."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SaveInterval:
    """Due at every step that is a multiple of ``every_steps`` (so a resumed run keeps the cadence) or
    once ``every_minutes`` have passed since the last checkpoint of this process (or its start); 0 = off."""
    every_steps: int = 0
    every_minutes: float = 0.0
    saved_at: float = field(default_factory=time.monotonic)

    def time_is_up(self) -> bool:
        return bool(self.every_minutes) and time.monotonic() - self.saved_at >= 60.0 * self.every_minutes

    def due(self, step: int, time_is_up: bool | None = None) -> bool:
        """``time_is_up``: the minutes' verdict when the processes of a job agreed on one (rank 0's
        clock); None asks this process's clock."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.time_is_up() if time_is_up is None else time_is_up

    def saved(self) -> None:
        """A checkpoint was just written: the minutes count from now."""
        self.saved_at = time.monotonic()
