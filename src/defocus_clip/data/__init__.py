"""Data: LAION-style ingestion to WebDataset shards (`ingest`) and the embedded Twemoji demo set (`demo`).

Importing this package is cheap; pandas, pyarrow, Pillow and webdataset load only when a function needs them.
"""

from .demo import build_demo_data, demo_data_dir

__all__ = ["build_demo_data", "demo_data_dir"]
