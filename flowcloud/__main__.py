"""`python -m flowcloud` is the `flowcloud` command."""

import sys

from flowcloud.cli.main import main

sys.exit(main())
