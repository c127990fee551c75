"""Pure array numerics: no file I/O, no Dask, no global state.

Every function takes arrays of one namespace (numpy or cupy) and returns arrays
of the same namespace (see :mod:`hetero_dask.core.backend`).
"""
