"""``python -m spark_core.distributed``: one rank of a train stage (started by torchrun / accelerate launch)."""

import sys

from spark_core.distributed.launch import main

sys.exit(main())
