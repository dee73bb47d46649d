"""``python -m agent_clients --backend docker|kubernetes|package.module:Class ...``"""

import sys

from agent_clients.runtime.agent import main

if __name__ == "__main__":
    sys.exit(main())
