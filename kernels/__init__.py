"""Models and array kernels. Kernels map arrays to arrays and know nothing of Dask or Zarr.

The contract is in :mod:`kernels.contract`; kernels are found by name through
:mod:`kernels.registry` and kept loaded per worker process by :mod:`kernels.resident`.
"""

from kernels.contract import BatchContext, Kernel, KernelParams, KernelTraits, Scaling
from kernels.errors import KernelError, ModelFileError
from kernels.registry import KernelSpec, available_kernels, build_kernel, register
from kernels.resident import load_counts, resident

__all__ = ["BatchContext", "Kernel", "KernelParams", "KernelTraits", "Scaling", "KernelError", "ModelFileError",
           "KernelSpec", "available_kernels", "build_kernel", "register", "load_counts", "resident"]
