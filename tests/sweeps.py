"""The tiny sweep the harness tests run: ``python -m esc.run -m +experiment=tiny`` with rows, cache and data under a temporary folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from esc.config import CONF_DIR

ROOT = CONF_DIR.parent


def sweep(tmp_path: Path, *extra: str, wait: bool = True, rc: int = 0):
    cmd = [sys.executable, "-m", "esc.run", "-m", "+experiment=tiny", f"paths.rows={tmp_path}/rows",
           f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data", f"hydra.sweep.dir={tmp_path}/multirun", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
