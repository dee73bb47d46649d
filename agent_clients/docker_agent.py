"""``python -m agent_clients.docker_agent``: the agent with the Docker backend by default."""

import sys

from agent_clients.runtime.agent import main

if __name__ == "__main__":
    sys.exit(main(default_backend="docker"))
