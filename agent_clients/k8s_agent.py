"""The Kubernetes agent: ``python -m agent_clients.k8s_agent``.

The shared agent runtime with the Kubernetes backend as the default; set
``HA_BACKEND=lease`` to run several replicas behind a coordination.k8s.io Lease.
"""

from __future__ import annotations

import sys

from agent_clients.runtime.agent import main

if __name__ == "__main__":
    sys.exit(main(default_backend="kubernetes"))
