"""The desktop image refuses clipboard settings that are not numbers: they become Xvnc
arguments (images/desktop/entrypoint.sh), so a value with a space could add others."""

import pytest

from tests.docker.conftest import IMAGE, RUN_ID

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.mark.parametrize(
    "name", ["VNC_CLIPBOARD_TO_DESKTOP", "VNC_CLIPBOARD_TO_BROWSER", "VNC_CLIPBOARD_MAX_TO_DESKTOP"]
)
def test_a_clipboard_setting_that_is_not_a_number_stops_the_desktop(docker_client, name):
    container = docker_client.containers.run(
        IMAGE, name=f"{RUN_ID}-clip-{name.lower().replace('_', '-')}", detach=True,
        environment={"VNC_PASSWORD": "s3cret-pw", name: "1 -SecurityTypes None"},
    )  # fmt: skip
    try:
        assert container.wait(timeout=30)["StatusCode"] == 64
        assert "bad VNC_CLIPBOARD_* value '1 -SecurityTypes None'" in container.logs().decode()
    finally:
        container.remove(force=True)
