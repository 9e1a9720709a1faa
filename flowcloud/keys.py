"""Every Redis key name and stream field name FlowCloud uses. Nothing else spells a key.

All keys share one prefix so that a Redis instance can be shared (and inspected) safely.
Stream ids are device ids: one device sends one live stream.

Redis Cluster: every key of one stream (its frames, metadata, results and their indexes, alert
state) carries the stream id as its hash tag, ``{<stream id>}``, so that it lives in one slot and
one Lua script or MULTI may touch several of them. The frame queues are sharded: ``frame_shard(i)``
for ``i < shards``, with the shard of a stream given by `shard_of` (a stable hash of its id). Keys
of different streams, tenants or shards are never touched by one command, script or transaction.
"""

from __future__ import annotations

import re
import zlib

PREFIX = "fc"

# Names that become part of key names (device ids = stream ids, tenants): one rule for all.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IDENTIFIER_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"


def is_identifier(name: object) -> bool:
    return isinstance(name, str) and IDENTIFIER.fullmatch(name) is not None


def tag(name: str) -> str:
    """``name`` as a Redis Cluster hash tag: keys holding the same tag share one slot."""
    return f"{{{name}}}"


# --- frame queue shards ---------------------------------------------------------------------
MAX_SHARDS = 64


def shard_of(stream_id: str, shards: int) -> int:
    """The frame-queue shard of a stream: a stable hash of its id (CRC-32, the same in every
    process and release), modulo the number of shards."""
    return zlib.crc32(stream_id.encode()) % shards


def frame_shard(shard: int) -> str:
    """Stream: the live frame queue of shard ``shard`` (workers share group WORKER_GROUP on each)."""
    return f"{PREFIX}:frames:{tag(f'shard-{shard}')}"


def backfill_shard(shard: int) -> str:
    """Stream: the backfill lane of shard ``shard`` (same slot as its live queue)."""
    return f"{PREFIX}:frames:backfill:{tag(f'shard-{shard}')}"


# --- frames: gateway -> workers ------------------------------------------------------------
# A frame's bytes are written once, to its stream's frame log (`stream_frames`, or `backfill_frames`
# for spooled video); the shard queues carry references to them (the fields below without F_DATA,
# plus F_FRAME_ID), which workers read through the consumer group WORKER_GROUP (flowcloud.frame_log).
WORKER_GROUP = "workers"  # the consumer group KEDA measures lag on (one per shard queue)
DEAD_LETTER_STREAM = f"{PREFIX}:frames:dead"  # frame references that failed too often, with their error

# Fields of a frame-log entry (see flowcloud.frames.Frame); a shard-queue entry has them all but F_DATA.
F_STREAM = "stream"
F_SEQ = "seq"
F_CAPTURE_TS = "capture_ts"  # edge capture time, mapped to Redis's clock (unix seconds)
F_RECV_TS = "recv_ts"  # gateway receive time, on Redis's clock (unix seconds)
# Stage stamps (flowcloud.stages), on Redis's clock; absent from entries of older gateways.
F_SENT_TS = "sent_ts"  # edge send time, mapped like the capture time (absent: an older edge)
F_DECODED_TS = "decoded_ts"  # the gateway's decoder gave the picture back
F_PUBLISHED_TS = "published_ts"  # the gateway wrote the entry
F_WIDTH = "width"
F_HEIGHT = "height"
F_ENCODING = "encoding"
F_DATA = "data"
F_BACKFILL = "backfill"  # "1" on a frame of the backfill lane (absent on live frames)
F_FRAME_ID = "frame_id"  # on a shard-queue entry: the id of the frame's entry in its stream's frame log
# Extra fields of a dead-letter entry.
F_ERROR = "error"
F_ATTEMPTS = "attempts"
F_SOURCE_ID = "source_id"  # the reference's id on its shard queue
F_SOURCE_QUEUE = "source_queue"  # the shard queue it was read from
F_CONSUMER = "consumer"  # the worker that gave up on it

# --- streams (per device) -----------------------------------------------------------------
STREAMS_INDEX = f"{PREFIX}:streams"  # sorted set: stream id -> last seen (unix seconds)


def stream_meta(stream_id: str) -> str:
    """Hash: device, tenant, width, height, fps, last_seen, started, status, last_seq, trimmed_unread."""
    return f"{PREFIX}:stream:{tag(stream_id)}"


def stream_frames(stream_id: str) -> str:
    """Stream (MAXLEN ~ stream_frames_maxlen): the stream's live frames, bytes included, the one copy
    of them in Redis; workers fetch them by the id a shard-queue reference names, the API draws
    overlays on them."""
    return f"{PREFIX}:stream:{tag(stream_id)}:frames"


def backfill_frames(stream_id: str) -> str:
    """Stream (MAXLEN ~ backfill_maxlen): the stream's spooled frames (the backfill lane), apart from
    its live ones so that a backfill burst never evicts live frames."""
    return f"{PREFIX}:stream:{tag(stream_id)}:backfill"


# Fields of a stream_meta hash (written by the gateway).
M_DEVICE = "device"
M_TENANT = "tenant"
M_WIDTH = "width"  # the resolution the edge sends (before resizing to the model input)
M_HEIGHT = "height"
M_FPS = "fps"
M_LAST_SEEN = "last_seen"  # unix seconds of the last frame published
M_STARTED = "started"  # unix seconds the current (or last) session began
M_STATUS = "status"  # STATUS_LIVE while a session is open, else STATUS_IDLE
M_LAST_SEQ = "last_seq"  # the last frame seq handed out (gateways HINCRBY it): unique across replicas
M_TRIMMED_UNREAD = "trimmed_unread"  # its frames trimmed from a shard queue before a worker read them
M_EVICTED = "evicted"  # its frames whose bytes left the frame log before a worker fetched them
# The seqs a live session reserved for the device's spooled frames (HELLO ``spooled``), so that
# backfilled results sort in capture order: the last one handed out, and the last reserved.
M_BACKFILL_LAST_SEQ = "backfill_last_seq"
M_BACKFILL_END_SEQ = "backfill_end_seq"
M_BACKFILL_RANGES = "backfill_ranges"  # the reserved seqs not handed out yet: "first-last first-last"
M_BACKFILL_LAST_CAPTURE = "backfill_last_capture"  # edge capture µs of the newest backfill frame published
# The live session's lease (services.gateway.lease): its generation, raised by each new session
# (fencing: a frame carrying an older generation is not published), who holds it, and until when.
M_GENERATION = "generation"
M_OWNER = "owner"  # "<gateway replica> <session id>"
M_LEASE_UNTIL = "lease_until"  # unix seconds on Redis's clock; renewed while the session lives
STATUS_LIVE = "live"
STATUS_IDLE = "idle"


# --- results (masks) ------------------------------------------------------------------------
def mask_index(stream_id: str) -> str:
    """Sorted set: frame seq -> frame seq (scored by seq for ordering and paging)."""
    return f"{PREFIX}:stream:{tag(stream_id)}:masks"


def mask(stream_id: str, seq: int) -> str:
    """Hash: one mask result (see flowcloud.results.MaskResult)."""
    return f"{PREFIX}:mask:{tag(stream_id)}:{seq}"


def unfinished_results(stream_id: str) -> str:
    """Set: seqs of results written whose results-shard event (and tenant account) may be missing
    yet (flowcloud.results: finished in the next round trip, or by a redelivery after a crash)."""
    return f"{PREFIX}:stream:{tag(stream_id)}:unfinished"


def edge_mask_index(stream_id: str) -> str:
    """Sorted set: masks the edge made offline (fallback model), capture µs -> capture time."""
    return f"{PREFIX}:stream:{tag(stream_id)}:edge-masks"


def edge_mask(stream_id: str, capture_us: int) -> str:
    """Hash: one edge-made mask (a MaskResult with producer "edge"), beside any cloud result."""
    return f"{PREFIX}:edge-mask:{tag(stream_id)}:{capture_us}"


def attempts(stream_id: str, seq: int) -> str:
    """Counter: how many times a worker failed on a frame (for dead-lettering)."""
    return f"{PREFIX}:attempts:{tag(stream_id)}:{seq}"


# --- devices and API keys -------------------------------------------------------------------
DEVICES_INDEX = f"{PREFIX}:devices"  # set of device ids
# pub/sub channel: "revoked <id>", "rotated <id>", "connected <id> <session> <generation>"
# (flowcloud.registry)
DEVICE_EVENTS = f"{PREFIX}:device-events"


def device(device_id: str) -> str:
    """Hash: tenant, salt, token_hash, created, revoked."""
    return f"{PREFIX}:device:{device_id}"


# Fields of a device hash (flowcloud.registry).
D_TENANT = "tenant"
D_SALT = "salt"
D_TOKEN_HASH = "token_hash"
D_CREATED = "created"  # unix seconds
D_ROTATED = "rotated"  # unix seconds of the last token rotation (absent before one)
D_REVOKED = "revoked"  # unix seconds of revocation (absent while the device is active)


APIKEYS_INDEX = f"{PREFIX}:apikeys"  # set of API key ids


def apikey(key_id: str) -> str:
    """Hash: role, tenant, salt, secret_hash, created, revoked."""
    return f"{PREFIX}:apikey:{key_id}"


# Fields of an apikey hash (services.api.apikeys).
A_ROLE = "role"  # admin or reader
A_TENANT = "tenant"
A_SALT = "salt"
A_SECRET_HASH = "secret_hash"
A_CREATED = "created"  # unix seconds
A_REVOKED = "revoked"  # unix seconds of revocation (absent while the key is active)


# --- workers --------------------------------------------------------------------------------
WORKERS_INDEX = f"{PREFIX}:workers"  # sorted set: worker name -> last heartbeat


def worker(name: str) -> str:
    """Hash with a TTL: model, device, state (loading/ready/draining), batch stats."""
    return f"{PREFIX}:worker:{name}"


# Fields and states of a worker's heartbeat hash.
W_STATE = "state"
W_HEARTBEAT = "heartbeat"  # unix seconds of the last beat
WORKER_LOADING, WORKER_WARMING, WORKER_READY, WORKER_DRAINING = "loading", "warming", "ready", "draining"


# --- result indexes (written by flowcloud.results.MaskStore, read by the query API) ----------
def tenant_streams(tenant: str) -> str:
    """Sorted set: the tenant's stream ids -> last seen (a reader's /streams reads only this)."""
    return f"{PREFIX}:tenant:{tenant}:streams"


def class_index(stream_id: str, class_name: str, level: int) -> str:
    """Sorted set: results whose share of the class is at least share_index.LEVELS[level]:
    member "<seq>:<share>", score capture_ts."""
    return f"{PREFIX}:stream:{tag(stream_id)}:class:{class_name}:{level}"


def class_indexes(stream_id: str) -> str:
    """Set: the class_index keys a stream has (what retention trims)."""
    return f"{PREFIX}:stream:{tag(stream_id)}:classes"


def share_buckets(stream_id: str, minute: int) -> str:
    """Sorted set: per-class share aggregates of one minute of results (share_index.Bucket)."""
    return f"{PREFIX}:stream:{tag(stream_id)}:agg:{minute}"


def results_shard(shard: int) -> str:
    """Stream: one entry per new result of the streams of shard ``shard`` (`shard_of`, as their
    frames): what alert evaluators read, in group ALERTS_GROUP on every shard."""
    return f"{PREFIX}:results:{tag(f'shard-{shard}')}"


ALERTS_GROUP = "alerts"  # the consumer group of alert evaluators on each results_shard
# Fields of an entry on a results_shard.
R_STREAM = "stream"
R_SEQ = "seq"
R_CAPTURE_TS = "capture_ts"
R_SHARES = "shares"  # JSON: class name -> share


def tenant_memory(tenant: str) -> str:
    """Sorted set: the tenant's results "<stream>:<seq>:<size>" -> capture_ts (memory retention
    order). Tagged by the tenant: one script updates it with tenant_usage."""
    return f"{PREFIX}:tenant:{tag(tenant)}:results"


def tenant_usage(tenant: str) -> str:
    """Counter: bytes of the tenant's stored results (same slot as tenant_memory)."""
    return f"{PREFIX}:tenant:{tag(tenant)}:result-bytes"


# --- alerts (services/alerts, services/api/routes/alerts.py) ---------------------------------
def alert_rules(tenant: str) -> str:
    """Hash: rule id -> rule JSON (services.alerts.rules.AlertRule)."""
    return f"{PREFIX}:tenant:{tenant}:alert-rules"


ALERT_TENANTS = f"{PREFIX}:alert-tenants"  # set of tenants that have rules


def alert_state(rule_id: str, stream_id: str) -> str:
    """Hash: one rule's evaluation state on one stream (last seq, run start, last firing)."""
    return f"{PREFIX}:alert:{rule_id}:state:{tag(stream_id)}"


def alert_firing(stream_id: str, firing_id: str) -> str:
    """Hash: one firing (of a result of ``stream_id``) and its webhook delivery status; in the
    stream's slot, so that the evaluator's script records it with the rule's state there."""
    return f"{PREFIX}:firing:{tag(stream_id)}:{firing_id}"


def tenant_firings(tenant: str) -> str:
    """Sorted set: the tenant's firing ids -> firing time (what the API lists)."""
    return f"{PREFIX}:tenant:{tenant}:firings"


FIRINGS_STREAM = f"{PREFIX}:firings"  # firings to deliver; consumer group WEBHOOK_GROUP
FIRINGS_STREAM_MAXLEN = 100_000  # its default bound (FLOWCLOUD_ALERTS_FIRINGS_MAXLEN)
WEBHOOK_GROUP = "webhooks"
WEBHOOK_DEAD_LETTER = f"{PREFIX}:firings:dead"  # firings whose webhook failed every try
FI_ID = "id"  # field of a FIRINGS_STREAM entry: the firing id
