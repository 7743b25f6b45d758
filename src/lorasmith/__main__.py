import sys

from lorasmith.cli import main

sys.exit(main())
