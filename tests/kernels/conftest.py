"""Kernel-test settings: make the Triton interpreter usable with NumPy >= 2.3.

The interpreter holds every scalar as a 1-element array and converts it to an int with
``int(array)``, which NumPy 2.3+ rejects for arrays with ndim > 0. That breaks any ``range()``
over run-time values (the key loop of the attention kernel). Convert through the single element
instead. Only the interpreter is touched; compiled kernels are unaffected.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_with_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index
