"""Whole data sets: explain every image of a folder, list or table into a resumable Parquet store, on this
machine or a Ray cluster, and report where the model looks per class (see ``docs/datasets.md``).

>>> from lumos.dataset import explain_dataset, RunOptions
>>> explain_dataset(["photos/"], ExplainSpec(methods=("gradcam",)), "store/", options=RunOptions(target="both"))
>>> write_report(dataset_report("store/"), "report/")   # report.png, report.html, report.json
"""

from lumos.dataset.batch import BatchWorker, RunOptions, decode_map, spec_hash
from lumos.dataset.report import DatasetReport, dataset_report, write_report
from lumos.dataset.run import ENGINES, DatasetRun, explain_dataset
from lumos.dataset.sources import Item, list_items
from lumos.dataset.store import Store, read_store

__all__ = ["BatchWorker", "DatasetReport", "DatasetRun", "ENGINES", "Item", "RunOptions", "Store", "dataset_report",
           "decode_map", "explain_dataset", "list_items", "read_store", "spec_hash", "write_report"]
