"""``python -m sdi_conformance pkg.module:attr``: run the suite without pytest."""

import sys

from .runner import main

sys.exit(main())
