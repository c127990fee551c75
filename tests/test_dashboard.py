"""The dashboard address a job prints must serve a page (bokeh is a dependency)."""

from __future__ import annotations

import urllib.request

from hetero_dask.runtime.cluster import open_client
from hetero_dask.runtime.progress import print_dashboard


def test_printed_dashboard_address_serves_pages(capsys):
    with open_client(workers=1, processes=False) as client:
        link = print_dashboard(client)
        assert link and link in capsys.readouterr().out
        page = link.replace("/status", "/info/main/workers.html")
        with urllib.request.urlopen(page, timeout=30) as response:
            assert response.status == 200
