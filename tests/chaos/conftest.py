"""Chaos tests: real processes (Daphne, Celery, the Docker agent on the real engine) put
through what operators and machines do to them. The fixtures are the end-to-end ones."""

from tests.e2e.conftest import docker_client, docker_stack  # noqa: F401 (re-exported fixtures)
