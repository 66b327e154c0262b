"""diffkern.kernels: Triton kernels and their launch helpers.

Importing a kernel module needs triton; set TRITON_INTERPRET=1 *before* the import to run the
kernels on CPU tensors (tests do this in tests/conftest.py). Nothing here imports diffkern's
methods."""
