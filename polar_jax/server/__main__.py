"""python -m polar_jax.server serve|bench ..."""

import sys

from polar_jax.server.cli import main

sys.exit(main())
