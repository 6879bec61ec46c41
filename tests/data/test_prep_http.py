"""Downloads against a local HTTP server on 127.0.0.1: successes, HTTP errors, timeouts, retries, user agent."""

from __future__ import annotations

import pandas as pd

from defocus_clip.data.ingest import FetchConfig, PrepConfig, ResizeConfig, prepare


def test_http_sources(tmp_path, http_server):
    base, handler = http_server
    rows = [{"url": f"{base}/img/ok{i}.jpg", "caption": f"img {i}"} for i in range(4)]
    rows += [
        {"url": f"{base}/img/cmyk.jpg", "caption": "cmyk"},
        {"url": f"{base}/flaky/ok5.jpg", "caption": "flaky: 503 first, then 200"},
        {"url": f"{base}/status/404", "caption": "gone"},
        {"url": f"{base}/status/500", "caption": "server error"},
        {"url": f"{base}/slow", "caption": "times out"},
        {"url": f"{base}/img/not_an_image.jpg", "caption": "html"},
        {"url": "ftp://example.invalid/x.jpg", "caption": "unsupported"},
        {"url": None, "caption": "no url"},
    ]
    p = tmp_path / "urls.parquet"
    pd.DataFrame(rows).to_parquet(p)
    fetch = FetchConfig(timeout=0.5, retries=1, retry_backoff=0.01, threads=4, user_agent="defocus-test/1.0")
    s = prepare(PrepConfig(inputs=[str(p)], output_dir=str(tmp_path / "out"), samples_per_shard=100, progress=False,
                           resize=ResizeConfig(16), fetch=fetch))
    assert s["successes"] == 6
    assert s["failures"] == {"http_404": 1, "http_500": 1, "download_timeout": 1, "decode_error": 1,
                             "unsupported_url": 1, "missing_url": 1}
    assert handler.hits["/status/404"] == 1  # a 404 is final
    assert handler.hits["/status/500"] == 2  # a 500 is retried
    assert handler.hits["/flaky/ok5.jpg"] == 2
    assert set(handler.user_agents) == {"defocus-test/1.0"}
    df = pd.read_parquet(tmp_path / "out" / "00000.parquet")
    assert list(df.url[:-1]) == [r["url"] for r in rows[:-1]]  # input order kept despite concurrent downloads
    assert df.set_index("status").loc["http_404", "error_message"].startswith("HTTP 404")
