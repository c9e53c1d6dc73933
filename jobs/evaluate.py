"""Job entrypoint for `raylm evaluate`: test-split metrics and report.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py -c CFG [--set KEY=VALUE]

Same arguments and exit codes as the CLI (2: bad config, 1: failure), so `ray job status` shows FAILED.
"""

import sys
from pathlib import Path

# the uploaded working dir has no install: import raylm from its source root next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

import raylm.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(raylm.cli.main(verb="evaluate"))
