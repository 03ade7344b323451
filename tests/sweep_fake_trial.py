"""A stand-in for `research train` in the sweep store's tests: it records each call, sleeps
FAKE_TRIAL_S seconds and writes its `optim.lr` as the trial's eval_loss, so worker tests run
many trials in seconds. Called as the runner calls a trial: BASE --run-dir DIR key=value ...
Given source weights (a mixture sweep), it also writes each source's eval loss from the law
loss(s) = 1 + exp(-2 w_s + 0.5 (1 - w_s)) (tests/test_mixture_laws.py).
"""

import json
import math
import os
import sys
import time
from pathlib import Path

run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
with (run_dir / "calls").open("a") as calls:
    calls.write(f"{os.getppid()} {os.getpid()}\n")  # the worker that started this attempt, and it
try:
    time.sleep(float(os.environ.get("FAKE_TRIAL_S", "0.2")))
except KeyboardInterrupt:  # stopped by its worker, or its worker died (PR_SET_PDEATHSIG)
    sys.exit(130)
overrides = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
entry = {"step": 1, "eval_loss": float(overrides["optim.lr"])}
weights = {key.split(".")[2]: float(v) for key, v in overrides.items()
           if key.startswith("data.sources.") and key.endswith(".weight")}
entry |= {f"eval/{name}/loss": 1 + math.exp(-2 * w + 0.5 * (1 - w)) for name, w in weights.items()}
(run_dir / "metrics.jsonl").write_text(json.dumps(entry) + "\n")
