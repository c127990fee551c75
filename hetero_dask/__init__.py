"""hetero_dask: heterogeneous refinement, reconstruction and regrouping of cryo-EM particles on Dask."""

__version__ = "0.1.0"

from hetero_dask.jobs.reconstruct import reconstruct as reconstruct  # noqa: E402
from hetero_dask.jobs.refine import refine as refine  # noqa: E402
from hetero_dask.jobs.regroup import regroup as regroup  # noqa: E402  (imports numpy only)
from hetero_dask.runtime.submit import submit as submit  # noqa: E402
