"""scripts/build_images.sh after a build that died without its EXIT trap (SIGKILL): the
next build unmounts what the dead one left mounted in its work directory (the binds of
the shared caches), and only then removes the directory, so the caches survive."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.deploy.images import BUILD_TIMEOUT, ensure_image, run_build

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT)]


def mounted_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(f"{path}/")]  # fmt: skip


def test_a_build_sweeps_the_mounts_and_work_directory_a_killed_build_left(pytestconfig, tmp_path):
    ensure_image("redis", pytestconfig)  # the smallest image: the build below is then a no-op
    cache = tmp_path / "shared-cache"  # stands for /var/cache/streamspace/apt-archives
    cache.mkdir()
    (cache / "kept.deb").write_text("a cached package")
    work = Path(f"/var/tmp/streamspace-images.ssimg{uuid.uuid4().hex[:6]}")
    rootfs = work / "redis"
    (rootfs / "proc").mkdir(parents=True)
    (rootfs / "var/cache/apt/archives").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (work / "owner.pid").write_text(f"{dead.pid}\n")  # its build: gone
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    subprocess.run(["mount", "--bind", str(cache), str(rootfs / "var/cache/apt/archives")], check=True)
    try:
        assert len(mounted_under(work)) == 2
        assert run_build(["redis"], 300) == 0
        assert mounted_under(work) == []
        assert not work.exists()
        assert (cache / "kept.deb").read_text() == "a cached package"  # not removed through the bind
    finally:
        for mount in sorted(mounted_under(work), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
