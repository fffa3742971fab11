import sys

from gradgate.cli import main

sys.exit(main())
