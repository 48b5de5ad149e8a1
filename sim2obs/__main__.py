"""``python -m sim2obs`` runs the command line (also what ``torchrun -m sim2obs`` starts)."""

import sys

from sim2obs.cli import main

sys.exit(main())
