"""Test and benchmark support that ships with the package (as ``numpy.testing`` does).

``relion``: RELION's programs run as oracles and peers; ``atomic``: density maps from
atomic models (gemmi); ``scenarios``: particle sets projected by ``relion_project``
from those maps, with ground truth, and the scores a benchmark reports on them.
Nothing here is imported by the jobs; gemmi and the models are test/bench extras.
"""
