"""``python -m flame_client``: the same as the ``flame-client`` command."""

import sys

from flame_client.cli import main

sys.exit(main())
