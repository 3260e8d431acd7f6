# SPDX-License-Identifier: Apache-2.0
"""``python -m ditflow``: see :mod:`ditflow.cli`."""

import sys

from .cli import main

sys.exit(main())
