"""``python -m ttsearch``: the same command line as ``ttsearch``."""

import sys

from ttsearch.cli import main

sys.exit(main())
