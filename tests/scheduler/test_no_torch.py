"""The scheduler and block manager stay plain Python: importing them never loads torch."""

import subprocess
import sys


def test_scheduler_package_does_not_import_torch():
    code = (
        "import sys\n"
        "import pagedserve.scheduler.scheduler, pagedserve.scheduler.kv_cache_manager\n"
        "import pagedserve.sampling_params\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
