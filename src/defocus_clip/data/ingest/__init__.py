"""LAION-style ingestion: image-text metadata to WebDataset shards in img2dataset's layout.

Stages, as in img2dataset: `reader` (chunked metadata), `fetch` (bytes from paths and URLs), `resize` (Pillow),
`worker` (one shard, never raises), `writer` (tar + parquet + stats, committed by rename), `stats`, `verify`,
`reshard`. `prepare(PrepConfig)` is the one entry point.
"""

from .fetch import FetchConfig
from .main import PrepConfig, prepare
from .reshard import reshard
from .resize import ResizeConfig, ResizeMode, SampleError, process_image
from .verify import VerifyReport, verify_shards
from .worker import CaptionConfig

__all__ = ["PrepConfig", "prepare", "ResizeConfig", "ResizeMode", "FetchConfig", "CaptionConfig", "SampleError",
           "process_image", "reshard", "verify_shards", "VerifyReport"]
