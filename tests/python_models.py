"""Python models (config.yaml ``backend: python``) written into a test's repository."""

from __future__ import annotations

from pathlib import Path

DOUBLER_CONFIG = """\
backend: python
max_batch_size: 8
dynamic_batching: {{max_queue_delay_ms: {delay_ms}}}
execution_timeout_ms: {timeout_ms}
input:
  - {{name: x, datatype: INT32, dims: [4]}}
output:
  - {{name: y, datatype: INT32, dims: [4]}}
  - {{name: rows, datatype: INT32, dims: [1]}}
"""

DOUBLER_PY = '''\
"""y = 2 * x; rows = the batch's size. x[0] picks a failure: -1 raises, -2 exits, -3 hangs.
finalize appends its pid to <version dir>/finalized."""
import os
import time

import numpy as np


class Model:
    def initialize(self, config):
        self.name = config["model_name"]
        self.version_dir = config["version_dir"]

    def execute(self, inputs):
        x = inputs["x"]
        if (x[:, 0] == -1).any():
            raise ValueError("x[0] is -1")
        if (x[:, 0] == -2).any():
            os._exit(3)
        if (x[:, 0] == -3).any():
            time.sleep(60)
        rows = np.full((x.shape[0], 1), x.shape[0], np.int32)
        return {"y": x * 2, "rows": rows}

    def finalize(self):
        with open(os.path.join(self.version_dir, "finalized"), "a") as marker:
            marker.write(f"{os.getpid()}\\n")
'''


def write_doubler(repository: Path, *, delay_ms: float = 0.5, timeout_ms: int = 20_000) -> None:
    """``doubler``: a batched Python model whose input can make it raise, exit or hang."""
    version_dir = repository / "doubler" / "1"
    version_dir.mkdir(parents=True)
    (repository / "doubler" / "config.yaml").write_text(DOUBLER_CONFIG.format(delay_ms=delay_ms, timeout_ms=timeout_ms))
    (version_dir / "model.py").write_text(DOUBLER_PY)


STREAMER_CONFIG = """\
backend: python
decoupled: true
max_batch_size: 8
execution_timeout_ms: {timeout_ms}
input:
  - {name: n, datatype: INT32, dims: [1]}
output:
  - {name: i, datatype: INT32, dims: [1]}
"""

STREAMER_PY = '''\
"""A decoupled Python model: for a batch whose largest n is N, responses i = 0 .. N-1, the
last returned (flagged final). n = -1 raises after two responses, -2 exits after two,
-3 answers 7 responses 100 ms apart, -4 hangs after one; n >= 1000 sleeps 10 ms between
responses. A long stream (n >= 1000) closed early appends to <version dir>/closed."""
import os
import time

import numpy as np


class Model:
    def initialize(self, config):
        self.version_dir = config["version_dir"]

    def execute(self, inputs):
        n = inputs["n"]
        rows = n.shape[0]
        count = int(n.max())
        if (n == -3).any() or (n == -4).any():
            for i in range(7):
                if i:
                    time.sleep(100 if (n == -4).any() else 0.1)
                yield {"i": np.full((rows, 1), i, np.int32)}
            return None
        if (n == -1).any() or (n == -2).any():
            for i in range(2):
                yield {"i": np.full((rows, 1), i, np.int32)}
            if (n == -1).any():
                raise ValueError("n is -1")
            os._exit(3)
        try:
            for i in range(count - 1):
                if count >= 1000:
                    time.sleep(0.01)
                yield {"i": np.full((rows, 1), i, np.int32)}
        except GeneratorExit:
            if count < 1000:  # warm-up and the canary take one response and close: not counted
                raise
            with open(os.path.join(self.version_dir, "closed"), "a") as marker:
                marker.write(f"{os.getpid()}\\n")
            raise
        return {"i": np.full((rows, 1), count - 1, np.int32)}
'''


def write_streamer(repository: Path, *, timeout_ms: int = 20_000) -> None:
    """``streamer``: a decoupled Python model (a generator ``execute``) that can raise, exit or run long."""
    version_dir = repository / "streamer" / "1"
    version_dir.mkdir(parents=True)
    (repository / "streamer" / "config.yaml").write_text(STREAMER_CONFIG.replace("{timeout_ms}", str(timeout_ms)))
    (version_dir / "model.py").write_text(STREAMER_PY)
