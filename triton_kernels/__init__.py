"""Triton kernels of zigspark, importable as ``zigspark.triton_kernels``; one module per op.

Importing this package needs triton. The ops in ``zigspark.ops`` import these modules lazily, only when
the triton backend runs, so zigspark itself imports without triton.
"""
