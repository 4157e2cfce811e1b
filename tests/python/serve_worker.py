"""A trainer rank in its own process, for test_serve.py: streams batches from the daemon
and appends one fixed-size record per step (serve_helpers.rec_dtype) to ``out``, written
with one write() each so that a SIGKILL leaves whole records (at most one partial).

    python serve_worker.py '{"socket": ..., "dp_rank": 0, "dp_size": 4, "out": ...,
                             "until": 1000, "resume": true, ...}'

``until``: stop after the batch of step until-1. ``resume``: continue from the cursor of
the last whole record already in ``out`` (like a trainer restarting from a checkpoint).
"""

import json
import os
import sys
import time

import numpy as np

import millrace as mr
from serve_helpers import (cursor_of, flat_dtype, flat_record_of_batch, read_flat, read_records,
                           rec_dtype, record_of_batch)


def main():
    a = json.loads(sys.argv[1])
    rows = 8 // a["dp_size"]
    flat = a.get("flat", False)  # flat records (serve_helpers.flat_dtype): any shape
    dt = flat_dtype() if flat else rec_dtype(rows)
    fill = flat_record_of_batch if flat else record_of_batch
    cursor = a.get("cursor")
    if a.get("resume"):
        have = read_flat(a["out"]) if flat else read_records(a["out"], rows)
        # Drop a partial record a kill may have left, so appends stay aligned.
        with open(a["out"], "ab") as f:
            f.truncate(len(have) * dt.itemsize)
        if len(have):
            cursor = cursor_of(have[-1])
            if have[-1]["step"] + 1 >= a["until"]:
                return
    client = mr.Client(a["socket"], a["dp_rank"], a["dp_size"], job=a.get("job", "default"),
                       replica=a.get("replica", "0"), replicas=a.get("replicas", 1),
                       cursor=cursor, start_step=a.get("start_step"), hold=a.get("hold", 1),
                       reconnect_timeout=a.get("reconnect_timeout", 60.0),
                       connect_timeout=a.get("connect_timeout", 0.0),
                       register_cuda=False)
    fd = os.open(a["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rec = np.zeros(1, dt)
    pace = a.get("pace", 0.0)
    until = a["until"]
    try:
        client.connect()
        step = client.state_dict()["step"]
        while step + 1 < until:
            b = client.next_batch(timeout=a.get("batch_timeout", 120))
            rec[:] = 0
            fill(b, rec[0])
            os.write(fd, rec.tobytes())
            step = b.step
            if pace:
                time.sleep(pace)
    finally:
        os.close(fd)
        client.close()
    print(f"done at step {step}, reconnects {client.reconnects}", file=sys.stderr)


if __name__ == "__main__":
    main()
