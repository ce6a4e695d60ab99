"""A Hydra app reported to Argus: one batch per run or sweep, one job per Hydra job.

From the root of a clone:

    pip install '.[hydra]'
    export ARGUS_URL=http://127.0.0.1:8765     # `python3 argus.py serve`, or your server and ARGUS_TOKEN
    python3 examples/hydra_example/main.py                      # one batch with one job
    python3 examples/hydra_example/main.py -m lr=0.05,0.1,0.5   # one batch with three jobs

The callback is enabled in conf/config.yaml (hydra.callbacks.argus). Without ARGUS_URL
the app still runs; argus logs one warning and records nothing. Hydra writes its
outputs/ and multirun/ folders in the current directory.
"""

import random

import hydra

import argus


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> dict:
    job_id = argus.sub_env("${argus_job_id}")  # the job the callback opened for this run
    rng = random.Random(cfg.seed)
    xs = [rng.uniform(-1, 1) for _ in range(64)]
    data = [(x, 3.0 * x + rng.gauss(0, 0.1)) for x in xs]

    w = 0.0
    for epoch in range(cfg.epochs):
        grad = sum(2 * (w * x - y) * x for x, y in data) / len(data)
        w -= cfg.lr * grad
        mse = sum((w * x - y) ** 2 for x, y in data) / len(data)
        argus.emit("job_epoch", job_id=job_id, epoch=epoch, train_loss=mse, lr=cfg.lr)
    return {"mse": mse, "w": w}  # numbers returned by the task become the job's metrics


if __name__ == "__main__":
    main()
