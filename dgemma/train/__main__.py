"""`python -m dgemma.train CONFIG` (also the entry point under torchrun)."""

import sys

from .trainer import main

sys.exit(main())
