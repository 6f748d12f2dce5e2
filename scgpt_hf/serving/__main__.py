"""`python -m scgpt_hf.serving MODEL|REPOSITORY_DIR ...`: the same as `scgpt-hf serve`."""

import sys

from .server import main

sys.exit(main())
