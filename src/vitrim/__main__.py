"""``python -m vitrim`` is the ``vitrim`` command (also under ``torchrun -m vitrim``)."""
import sys

from .cli import main

sys.exit(main())
