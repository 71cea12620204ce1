"""``log.jsonl``: one JSON record per optimizer step, valid JSON only, one record per step across resumes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from mimsparse.train.checkpoint import write_text_atomic
from mimsparse.errors import OutputError


def json_safe(value):
    """NaN and +-inf -> None (JSON has no such numbers; Python's json would write a bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def start(self, step: int) -> int:
        """Keep only the records of steps ``<= step`` (those before the checkpoint a run resumes from;
        none for a fresh start) and lines that parse; a resumed run logs the later steps again.
        Returns how many records were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill in the middle of a write
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            self._guard(lambda: write_text_atomic(self.path, "".join(line + "\n" for line in kept)))
        return len(lines) - len(kept)

    def write(self, record: dict) -> None:
        text = json.dumps(json_safe(record), allow_nan=False) + "\n"

        def append():
            with open(self.path, "a") as f:
                f.write(text)

        self._guard(append)

    def _guard(self, write) -> None:
        try:
            write()
        except OSError as e:
            raise OutputError(f"cannot write the training log {str(self.path)!r} ({e.strerror or e}); the checkpoints "
                              f"in {str(self.path.parent)!r} are kept. Free disk space, then resume with "
                              f"--resume auto") from e
