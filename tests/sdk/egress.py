"""Calls livekit.Egress with the official Python SDK (livekit-api), as a backend would, and
prints one JSON line: what the call answered, or the error it raised.

Usage: egress.py URL KEY SECRET ACTION ARG...
  start_room ROOM        StartRoomCompositeEgress, a file output
  start_track ROOM TRACK StartTrackEgress, a file output
  list ROOM              ListEgress of the room
  stop EGRESS_ID         StopEgress
"""

import asyncio
import json
import sys
import time

from livekit import api


def info_json(info):
    return {
        "egress_id": info.egress_id,
        "room_name": info.room_name,
        "room_id": info.room_id,
        "started_at": str(info.started_at),
        "status": api.EgressStatus.Name(info.status),
    }


async def call(lk, action, args):
    if action == "start_room":
        request = api.RoomCompositeEgressRequest(
            room_name=args[0],
            layout="speaker",
            file_outputs=[api.EncodedFileOutput(filepath=f"/out/{args[0]}.mp4")],
        )
        return info_json(await lk.egress.start_room_composite_egress(request))
    if action == "start_track":
        request = api.TrackEgressRequest(
            room_name=args[0],
            track_id=args[1],
            file=api.DirectFileOutput(filepath=f"/out/{args[0]}.ogg"),
        )
        return info_json(await lk.egress.start_track_egress(request))
    if action == "list":
        answer = await lk.egress.list_egress(api.ListEgressRequest(room_name=args[0]))
        return {"items": [info_json(info) for info in answer.items]}
    if action == "stop":
        return info_json(await lk.egress.stop_egress(api.StopEgressRequest(egress_id=args[0])))
    raise SystemExit(f"unknown action {action}")


async def main():
    url, key, secret, action, *args = sys.argv[1:]
    # Default settings: the SDK's own 10 s timeout.
    lk = api.LiveKitAPI(url=url, api_key=key, api_secret=secret)
    began = time.monotonic()
    try:
        out = await call(lk, action, args)
    except api.TwirpError as error:
        out = {
            "error": {
                "code": error.code,
                "message": error.message,
                "status": error.status,
                "meta": error.metadata,
            }
        }
    finally:
        await lk.aclose()
    out["seconds"] = time.monotonic() - began
    print(json.dumps(out))


asyncio.run(main())
