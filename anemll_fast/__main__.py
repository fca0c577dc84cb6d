import sys

from anemll_fast.cli import main

sys.exit(main())
