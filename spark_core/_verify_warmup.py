"""Preloaded by the verify forkserver: warm Math-Verify once, so that every worker forked from it starts warm.

Importing this module costs a few seconds of CPU; nothing else should import it.
"""

from spark_core.verify import warm_up

warm_up()
