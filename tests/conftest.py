"""Test-wide settings: Triton kernels run in the interpreter when no GPU is present."""

import os
import shutil

if not shutil.which("nvidia-smi"):
    # Must be set before any @triton.jit function is defined (i.e. before kernels are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
