"""`python -m cli ...` is `nvae ...` (torchrun -m cli train ... on a cluster)."""

import sys

from cli.main import main

sys.exit(main())
