"""Shared helpers of the integration and end-to-end tests, one owner per helper.

``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml's pytest settings), so test files
import these modules as ``support.<module>``:

- ``api``: results, frames and API keys written through the real stores; a real uvicorn server.
- ``cli``: the ``flowcloud`` command line as a real process; adding a device through it.
- ``edge``: a tiny real gateway for the edge tests, PyAV decoding, the edge daemon's test config.
- ``frames``: the frames stream on Redis: what is on it, and publishing frames to it.
- ``gateway``: real H.264 and RTP, a test edge client that does the real handshake, gateway settings.
- ``tls``: a throwaway PKI made at test time.
- ``waiting``: polling until something holds (sync and async) and until a port listens.
- ``worker``: weights files, real worker processes and what they leave on Redis.
"""
