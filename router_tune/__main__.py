"""`python -m router_tune ...` and `accelerate launch -m router_tune train ...`."""

import sys

from router_tune.cli import main

sys.exit(main())
