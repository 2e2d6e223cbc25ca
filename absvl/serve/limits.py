"""Request limits of the HTTP service (kept free of heavy imports: the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    """Request limits; each refusal is a 4xx/5xx JSON error naming the field and the limit."""

    max_upload_bytes: int = 10 * 1024 * 1024  #: encoded image size (``--max-upload-mb``)
    max_pixels: int = 25_000_000  #: width × height of an uploaded image (``--max-pixels``)
    max_question_chars: int = 200
    max_query_chars: int = 200
    max_top_k: int = 20  #: answers per /vqa request
    max_k: int = 100  #: results per /search request
    max_rerank: int = 100  #: candidates re-scored top-down per /search request
    rerank_chunk: int = 32  #: candidates re-scored per model call; queued requests run between chunks
    max_pending: int = 64  #: requests queued for or using the model before 503 (``--max-pending``)
    request_timeout_s: int = 60  #: seconds a request may wait for and use the model before 504 (``--request-timeout``)
    #: seconds a client has to send a request's headers, from opening the connection or (kept alive)
    #: from the previous response (``--header-timeout``); then 408 and the connection is closed
    header_timeout_s: int = 10
    #: seconds a client has to send a request's body once its headers arrived (``--body-timeout``); then 408
    body_timeout_s: int = 60
    max_connections: int = 256  #: open connections; one more is answered 503 and closed (``--max-connections``)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
