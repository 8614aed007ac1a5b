"""`python -m examples.pong` (run from the repository root)."""

import sys

from examples.pong.pong import main

sys.exit(main())
