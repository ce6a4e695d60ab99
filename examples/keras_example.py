"""Report a Keras training run to Argus: one batch holding one job, one event per epoch.

From the root of a clone:

    pip install '.[keras]' torch               # or jax, or tensorflow, as the backend
    export KERAS_BACKEND=torch
    export ARGUS_URL=http://127.0.0.1:8765     # `python3 argus.py serve`, or your server and ARGUS_TOKEN
    python3 examples/keras_example.py

Without ARGUS_URL the run still trains; argus logs one warning and records nothing.
"""

import keras
import numpy as np

from argus.integrations.keras import ArgusCallback


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))).astype("float32")

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)], name="linear_regression")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse", metrics=["mae"])

    argus_callback = ArgusCallback(
        project="examples",
        job_id="linear-regression",
        dataset="synthetic",
        final_metric_keys=("val_loss", "val_mae"),  # sent with job_done
        stop_polling=True,  # the Stop button in Argus ends fit()
    )
    try:
        model.fit(x, y, epochs=3, batch_size=32, validation_split=0.25, callbacks=[argus_callback])
    except Exception as exc:
        # Keras has no failure hook: tell Argus why the run ended, then let it propagate.
        argus_callback.report_failure(exc)
        raise


if __name__ == "__main__":
    main()
