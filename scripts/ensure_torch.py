"""tox helper for the system-site-packages envs (report, gpu, bench, record): use the machine's
torch/triton when it has them (a GPU runner's CUDA builds); otherwise install the CPU build
that this project pins (`pip install torch==2.13.0` takes torch's CPU build here; a bare
`torch` would pull a multi-GB CUDA build)."""

import importlib.util
import subprocess
import sys

PINS = {"torch": "torch==2.13.0", "triton": "triton==3.9.0", "transformers": "transformers==5.24.0"}

missing = [pin for name, pin in PINS.items() if importlib.util.find_spec(name) is None]
if missing:
    print(f"ensure_torch: installing {' '.join(missing)}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
