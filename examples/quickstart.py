"""Two `with` blocks around a training loop.

From the root of a clone:

    python3 argus.py serve                       # a local collector; in another shell
    export ARGUS_URL=http://127.0.0.1:8765
    PYTHONPATH=. python3 examples/quickstart.py  # no PYTHONPATH needed after `pip install .`
"""

import math
import random

from argus import Reporter

with Reporter(source_project="quickstart", experiment_type="toy", n_total=2) as r:
    print("batch", r.batch_id)
    for lr in (1e-2, 1e-3):
        with r.job("toy_lr%g" % lr, model="toy", dataset="synthetic") as job:
            loss = 1.0
            for epoch in range(20):
                if job.stopped:  # Stop button in the UI (or `python3 -m argus stop BATCH_ID`)
                    job.log("stopped from the UI at epoch %d" % epoch, level="WARNING")
                    break
                loss *= 0.9 + random.random() * 0.05
                job.epoch(epoch, train_loss=loss, val_loss=loss * 1.1, lr=lr)
            job.metrics({"final_loss": loss, "log_loss": math.log(loss)})
