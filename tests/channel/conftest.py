import pytest

from tests.live import ControlPlane


@pytest.fixture(scope="session")
def control_plane(django_db_setup, django_db_blocker):
    """One Daphne process shared by the socket tests (tables are emptied between tests)."""
    cp = ControlPlane("daphne-a").start()
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def control_plane_b(django_db_setup, django_db_blocker):
    """A second Daphne process on the same database and channel layer."""
    cp = ControlPlane("daphne-b").start()
    yield cp
    cp.stop()
