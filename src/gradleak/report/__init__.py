"""The HTML report of a results store: tables, plots and reconstructions in one self-contained file."""

from gradleak.report.data import ReportData, load_report_data
from gradleak.report.page import render, write_report

__all__ = ["ReportData", "load_report_data", "render", "write_report"]
