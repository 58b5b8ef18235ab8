"""Regenerates the pictures in this folder from the current default run:

    python docs/images/regenerate.py

runs `fused-vae train` with no options (the default run of README: the bundled digits, 500
epochs, about half a minute on a CPU) from this checkout in a temporary directory and copies
the images it writes here, as IMAGES says. tests/test_plots.py checks that the committed files
have the size and layout that a run writes now, so a change to the pictures fails it until this
script has been run again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# file here -> the file of the run directory it is a copy of
IMAGES = {
    "digits-samples.png": "samples.png",
    "digits-reconstructions.png": "reconstructions.png",
    "digits-interpolation.png": "interpolation.png",
}


def main() -> int:
    """Trains the default run and copies its images into docs/images/; returns the exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fused_vae", "train", "--out-dir", tmp, "--no-progress"]
        done = subprocess.run(cmd, cwd=ROOT)  # from the checkout's root: -m runs this checkout's fused_vae
        if done.returncode:
            return done.returncode
        run = Path(tmp) / "digits-mlp"
        for name, source in IMAGES.items():
            shutil.copyfile(run / source, HERE / name)
            print(f"wrote {HERE / name} (a copy of the default run's {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
