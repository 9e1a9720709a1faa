"""`--record DIR`: each session's RTP packets saved as raw RFC 4571 bytes, for replay and debugging.

A session writes ``DIR/<device>-<start>-<session>.rfc4571``: the bytes exactly as received after
the handshake (2-byte big-endian length + RTP packet, repeated; the handshake itself, which holds
the token, is not saved) and a ``.json`` beside it with the session's description and clock
offset. Replay it into a gateway with ``flowcloud edge --source F`` (`edge.sources.RecordingSource`:
the same frames come out, at the recorded pace), or decode it with ``gst-launch-1.0 filesrc
location=F ! application/x-rtp-stream,encoding-name=H264 ! rtpstreamdepay ! rtph264depay ! ...``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO

from flowcloud.protocol.framing import DESCRIPTION_SUFFIX, RECORDING_SUFFIX

log = logging.getLogger(__name__)


class SessionRecorder:
    """Appends one session's packets to a file (buffered; closed with the session)."""

    def __init__(
        self, directory: str | Path, device_id: str, session_id: str, description: dict[str, Any]
    ) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.path = directory / f"{device_id}-{stamp}-{session_id}{RECORDING_SUFFIX}"
        self.path.with_suffix(DESCRIPTION_SUFFIX).write_text(json.dumps(description, indent=2) + "\n")
        self._file: BinaryIO | None = self.path.open("wb")
        self.bytes = 0

    def write(self, data: bytes) -> None:
        """Append bytes as received (already RFC 4571 framed)."""
        if self._file is None:
            return
        try:
            self._file.write(data)
            self.bytes += len(data)
        except OSError as exc:
            # A full disk stops the recording, never the session.
            log.warning("recording to %s stopped: %s", self.path, exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                log.warning("closing recording %s: %s", self.path, exc)
            self._file = None
