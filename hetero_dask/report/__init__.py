"""hetero_dask.report: plots and self-contained HTML reports for the jobs."""

from hetero_dask.report.html import (
    Image,
    KeyValues,
    Paragraph,
    Section,
    Table,
    render_html,
    write_html_report,
)
from hetero_dask.report.plots import (
    computed_shells,
    fsc_label,
    orientation_histogram,
    plot_affinity,
    plot_class_changes,
    plot_class_fractions,
    plot_class_table,
    plot_eigenvalues,
    plot_fsc,
    plot_fsc_classes,
    plot_map_views,
    plot_orientation_distribution,
    plot_resolution_history,
)

__all__ = [
    "Image",
    "KeyValues",
    "Paragraph",
    "Section",
    "Table",
    "computed_shells",
    "fsc_label",
    "orientation_histogram",
    "plot_affinity",
    "plot_class_changes",
    "plot_class_fractions",
    "plot_class_table",
    "plot_eigenvalues",
    "plot_fsc",
    "plot_fsc_classes",
    "plot_map_views",
    "plot_orientation_distribution",
    "plot_resolution_history",
    "render_html",
    "write_html_report",
]
