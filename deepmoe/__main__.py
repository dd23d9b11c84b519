"""`python -m deepmoe`, which is also what `torchrun -m deepmoe` runs on every rank."""

import sys

from .cli import main

sys.exit(main())
