"""``python -m lora_ext.cli COMMAND ...``: the same as the ``lora-ext`` command (and what
``torchrun -m lora_ext.cli train ...`` runs on every process)."""

import sys

from lora_ext.cli import main

sys.exit(main())
