"""A sottovoce client in raw pyzmq (no sottovoce import): the example in client/PROTOCOL.md."""

import json, os, sys, uuid
import numpy as np, soundfile, zmq
from zmq.utils.monitor import recv_monitor_message

endpoint = os.environ.get("SOTTOVOCE_ENDPOINT") or sys.exit("set SOTTOVOCE_ENDPOINT")
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # ping the daemon every second...
sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)  # ...and close the connection after 3 s without an answer
monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # says when the connection closes
sock.connect(endpoint)
poller = zmq.Poller()
poller.register(sock, zmq.POLLIN)
poller.register(monitor, zmq.POLLIN)


def send(header, payload=None):
    header.setdefault("id", uuid.uuid4().hex)
    sock.send_multipart([b"sottovoce/1", json.dumps(header).encode()] + ([payload] if payload else []))
    return header["id"]


def replies(ref, timeout_ms=120_000):
    while True:
        ready = dict(poller.poll(timeout_ms))
        if sock in ready:
            marker, header, *_ = sock.recv_multipart()
            msg = json.loads(header)
            if msg["type"] == "transcript-chunk" or msg.get("ref") not in (ref, None):
                continue  # an early transcript, or a reply to another request (ref null: ours, the only one open)
            yield msg
            if msg["type"] in ("done", "error", "info", "ok", "report"):
                return
        elif monitor in ready and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            sys.exit("the daemon closed the connection: it stopped or died")
        elif not ready:
            sys.exit("no reply from the daemon")


info = next(replies(send({"type": "hello", "client": "raw-example"}), timeout_ms=3000))
assert info["type"] == "info" and info["protocol"].split(".")[0] == "1", info

if len(sys.argv) > 1:  # a WAV file: stream it as 4096-sample chunks, then ask
    pcm, rate = soundfile.read(sys.argv[1], dtype="float32", always_2d=True)  # floats in [-1, 1]
    pcm = pcm.mean(axis=1).astype("<f4")
    send({"type": "reset"})
    for start in range(0, len(pcm), 4096):
        send({"type": "chunk", "rate": rate}, pcm[start : start + 4096].tobytes())
    ask = send({"type": "ask"})
else:
    ask = send({"type": "ask", "text": "What is the capital of France?"})

for msg in replies(ask):
    if msg["type"] == "transcript":
        print("heard:", msg["text"])
    elif msg["type"] == "answer-chunk":
        print(msg["text"], end="", flush=True)
    elif msg["type"] == "done":
        print("\n", json.dumps({"tokens": msg["tokens"], "seconds": msg["seconds"]}))
    else:
        sys.exit(f"error {msg['code']}: {msg['text']}")
