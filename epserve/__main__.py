import sys

from epserve.cli import main

sys.exit(main())
