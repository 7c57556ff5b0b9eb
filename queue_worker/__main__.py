import sys

from queue_worker.cli import main

sys.exit(main())
