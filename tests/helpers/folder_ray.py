"""One local Ray cluster per test folder: started by the folder's first module that asks for it
(never one RAY_ADDRESS or `ray start` left running: a connection another folder left behind is
closed first) and shut down once the folder's last test has torn down its fixtures, so later
folders neither share nor pay for it.

    _ray = FolderRay(Path(__file__).resolve().parent, num_cpus=8)

    @pytest.fixture(scope="module")
    def ray_cluster():
        return _ray.start()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(item, nextitem):
        try:
            return (yield)
        finally:
            _ray.stop_when_leaving(nextitem)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers.local_ray import start_local_ray


class FolderRay:
    """The Ray cluster of the tests under `folder`, with `num_cpus` logical CPUs."""

    def __init__(self, folder: Path, num_cpus: int) -> None:
        self.folder = folder
        self.num_cpus = num_cpus
        self.started = False

    def start(self) -> Any:
        """The `ray` module, connected to this folder's cluster (started on first use)."""
        import ray

        if not self.started:
            start_local_ray(self.num_cpus)
            self.started = True
        return ray

    def stop_when_leaving(self, nextitem: Any) -> None:
        """After a test's teardown: stop the cluster when the next test is outside the folder."""
        leaving = nextitem is None or self.folder not in Path(str(nextitem.path)).resolve().parents
        if leaving and self.started:
            self.started = False
            import ray

            if ray.is_initialized():
                ray.shutdown()
