"""Models and array kernels. Kernels map arrays to arrays and know nothing of Dask or Zarr."""

from kernels.base import Kernel, KernelSpec, build_kernel, resident

__all__ = ["Kernel", "KernelSpec", "build_kernel", "resident"]
