"""``python -m gatelab`` (and ``torchrun ... -m gatelab train CONFIG``): the ``gatelab`` command."""

import sys

from .cli import main

sys.exit(main())
