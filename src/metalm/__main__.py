import sys

from metalm.cli import main

sys.exit(main())
