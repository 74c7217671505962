import sys

from bonedrr.cli import main

sys.exit(main())
