"""Fixtures of the image tests: the engine and the desktop image (tests/docker/conftest.py)."""

from tests.docker.conftest import docker_client  # noqa: F401 (re-exported fixture)
