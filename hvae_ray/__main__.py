"""``python -m hvae_ray``: the command line (the same as the ``hvae-ray`` script)."""

import sys

from hvae_ray.cli import main

sys.exit(main())
