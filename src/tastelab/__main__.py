"""``python -m tastelab ...``: the same CLI as the ``tastelab`` console script (no venv script needed)."""

import sys

from tastelab.cli.main import main

sys.exit(main())
