import sys

from research.launch import main

sys.exit(main())
