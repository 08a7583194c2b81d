"""Read an offline W&B run folder back without the network (for tests).

An offline run keeps everything in ``run-<id>.wandb``: a leveldb-style log (7-byte file header ``:W&B`` + 0xBEE1 +
version, 32 KiB blocks, records with a 7-byte ``<crc, length, type>`` header; types FULL/FIRST/MIDDLE/LAST) whose
payloads are ``wandb_internal_pb2.Record`` messages. History rows are flushed when the run finishes.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B datastore"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"corrupt record in {path}"
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_folder: Path) -> dict[str, Any]:
    """``{"history": [rows], "config": {...}, "run": run record}`` of an ``offline-run-*`` folder."""
    (path,) = Path(run_folder).glob("run-*.wandb")
    out: dict[str, Any] = {"history": [], "config": {}, "run": None}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            out["run"] = r.run
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
    return out
