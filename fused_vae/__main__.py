"""``python -m fused_vae train | eval | sample`` (same as the ``fused-vae`` command)."""

import sys

from .cli import main

sys.exit(main())
