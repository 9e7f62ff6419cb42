// Calls livekit.Egress with the official Node SDK (livekit-server-sdk), as a backend would, and
// prints one JSON line: what the call answered, or the error it raised.
//
// Usage: node egress.cjs URL KEY SECRET ACTION ARG...
//   start_room ROOM   StartRoomCompositeEgress, a file output
//   list ROOM         ListEgress of the room
//   stop EGRESS_ID    StopEgress
const { EgressClient, EncodedFileOutput, EgressStatus } = require('livekit-server-sdk');

function infoJson(info) {
  return { egress_id: info.egressId, room_name: info.roomName, status: EgressStatus[info.status] };
}

async function call(client, action, args) {
  switch (action) {
    case 'start_room': {
      const file = new EncodedFileOutput({ filepath: `/out/${args[0]}.mp4` });
      return infoJson(await client.startRoomCompositeEgress(args[0], { file }, { layout: 'speaker' }));
    }
    case 'list':
      return { items: (await client.listEgress({ roomName: args[0] })).map(infoJson) };
    case 'stop':
      return infoJson(await client.stopEgress(args[0]));
    default:
      throw new Error(`unknown action ${action}`);
  }
}

async function main() {
  const [url, key, secret, action, ...args] = process.argv.slice(2);
  // Default settings: the SDK's own 10 s timeout.
  const client = new EgressClient(url, key, secret);
  const began = Date.now();
  let out;
  try {
    out = await call(client, action, args);
  } catch (error) {
    if (error.code === undefined && error.status === undefined) throw error;
    out = { error: { code: error.code, message: error.message, status: error.status, meta: error.metadata } };
  }
  out.seconds = (Date.now() - began) / 1000;
  console.log(JSON.stringify(out));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
