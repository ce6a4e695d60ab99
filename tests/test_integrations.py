"""argus.integrations: the Lightning, Keras and Hydra callbacks on the real frameworks.

The framework tests need torch, lightning, keras (torch backend) and hydra-core: tox's
`integrations` env installs them and sets REQUIRE_FRAMEWORKS=1, which turns a missing
framework into a failure. Elsewhere those tests are skipped; the import tests run everywhere.
Every event the fake server receives is validated against event_v1.json (conftest.py).
"""

from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
import textwrap

import pytest

import argus
from conftest import ROOT

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras
REQUIRE_FRAMEWORKS = os.environ.get("REQUIRE_FRAMEWORKS") == "1"
FRAMEWORK_MODULES = (
    "torch", "lightning", "pytorch_lightning", "keras", "tensorflow", "jax", "hydra", "omegaconf", "numpy"
)
pytestmark = [  # the frameworks' own deprecation noise
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


def need(module: str):
    if REQUIRE_FRAMEWORKS:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def events_of(fake, batch_id=None) -> list:
    """The events of one batch (or all), in the order they happened."""
    with fake.lock:
        events = list(fake.events.values())
    events.sort(key=lambda e: e["timestamp"])  # stable: ties keep arrival order
    return [e for e in events if batch_id is None or e["batch_id"] == batch_id]


def sequence(events) -> list:
    return [(e["event_type"], e["job_id"]) for e in events]


def wait_for_end(fake, n_batches: int = 1) -> None:
    def ended():
        return len(fake.of_type("batch_done") + fake.of_type("batch_failed")) >= n_batches

    assert fake.wait_for(ended, timeout=15), sequence(events_of(fake))


def run_python(args, cwd, fake, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), ARGUS_URL=fake.url, KERAS_BACKEND="torch")
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args], cwd=str(cwd), env=full_env, capture_output=True, text=True, timeout=timeout
    )


# --- import paths: no framework needed ------------------------------------------------------


def test_importing_argus_or_its_integration_modules_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import argus
        import argus.integrations.lightning, argus.integrations.keras, argus.integrations.hydra
        from argus.integrations import lightning, keras, hydra
        print(sorted(m for m in %r if m in sys.modules))
        """
        % (FRAMEWORK_MODULES,)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_integration_paths_resolve_although_argus_is_one_module():
    import argus.integrations.hydra as hydra_module

    assert argus.integrations.hydra is hydra_module
    assert sys.modules["argus.integrations.lightning"] is argus.integrations.lightning
    assert importlib.import_module("argus.integrations.keras") is argus.integrations.keras
    assert importlib.util.find_spec("argus.integrations.keras").name == "argus.integrations.keras"
    assert "ArgusCallback" in dir(argus.integrations.lightning)
    with pytest.raises(AttributeError):
        argus.integrations.lightning.NoSuchThing  # noqa: B018


BLOCK_FRAMEWORKS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in %r:
            raise ModuleNotFoundError("No module named %%r" %% name, name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    "name, framework, blocked",
    [
        ("lightning", "Lightning", ("lightning", "pytorch_lightning")),
        ("keras", "Keras", ("keras", "tensorflow")),
        ("hydra", "Hydra", ("hydra", "omegaconf")),
    ],
)
def test_a_missing_framework_raises_import_error_naming_the_extra_when_used(name, framework, blocked):
    code = BLOCK_FRAMEWORKS % (blocked,) + textwrap.dedent(
        """
        import argus.integrations.{name}  # importing the module is fine
        try:
            from argus.integrations.{name} import ArgusCallback
        except ImportError as exc:
            print(exc)
        """.format(name=name)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "argus.integrations.%s needs %s: pip install 'argus-reporter[%s]'" % (name, framework, name)
    )


def test_hydra_instantiates_the_callback_from_its_target_path():
    hydra_utils = need("hydra.utils")

    callback = hydra_utils.instantiate(
        {"_target_": "argus.integrations.hydra.ArgusCallback", "project": "demo", "job_id_template": "{a}"}
    )
    assert type(callback) is argus.integrations.hydra.ArgusCallback
    assert hydra_utils.get_class("argus.integrations.lightning.ArgusCallback").__module__ == (
        "argus.integrations.lightning"
    )


# --- Lightning ------------------------------------------------------------------------------


def lightning_setup(torch, L, *, fail_at_epoch=None, fail_in_validation=False):
    """A linear model whose train loss is logged from its own on_train_epoch_end hook
    (which Lightning runs after the callbacks' hook of that name), val loss from
    validation_step, with StepLR halving lr=0.1 after every epoch."""

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.step_losses = []
            self.epoch_train_losses = []

        def training_step(self, batch, batch_idx):
            if self.current_epoch == fail_at_epoch:
                raise ValueError("boom at epoch %d" % self.current_epoch)
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.step_losses.append(loss.detach())
            return loss

        def on_train_epoch_end(self):
            mean = torch.stack(self.step_losses).mean()
            self.step_losses.clear()
            self.epoch_train_losses.append(float(mean))
            self.log("train_loss", mean)

        def validation_step(self, batch, batch_idx):
            if fail_in_validation:
                raise RuntimeError("bad validation data")
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    return Linear(), loader


def lightning_trainer(L, callbacks, **kwargs):
    kwargs.setdefault("max_epochs", 3)
    return L.Trainer(
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def val_loss_recorder(L):
    class Recorder(L.Callback):
        def __init__(self):
            self.val_losses = {}

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.val_losses[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])

    return Recorder()


def test_lightning_fit_sends_one_epoch_event_per_epoch_with_losses_and_lr(fake):
    torch, L = need("torch"), need("lightning.pytorch")
    from argus.integrations.lightning import ArgusCallback

    model, loader = lightning_setup(torch, L)
    recorder = val_loss_recorder(L)
    callback = ArgusCallback(
        project="demo", job_id="linear-3ep", argus_url=fake.url, dataset="synthetic", final_metric_keys=("val_loss",)
    )
    trainer = lightning_trainer(L, [callback, recorder])  # 2 sanity-check batches run first
    trainer.fit(model, loader, loader)
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "linear-3ep"),
        ("job_epoch", "linear-3ep"),
        ("job_epoch", "linear-3ep"),
        ("job_epoch", "linear-3ep"),
        ("job_done", "linear-3ep"),
        ("batch_done", None),
    ]
    start, job_start = events[0], events[1]
    assert start["batch_id"].startswith("lightning-")
    assert start["source"]["project"] == "demo"
    assert start["data"]["experiment_type"] == "lightning" and start["data"]["n_total_jobs"] == 1
    assert job_start["data"] == {"model": "Linear", "dataset": "synthetic"}
    epochs = [e["data"] for e in events if e["event_type"] == "job_epoch"]
    assert [d["epoch"] for d in epochs] == [0, 1, 2]
    assert [d["lr"] for d in epochs] == pytest.approx([0.1, 0.05, 0.025])  # at each epoch's start
    assert [d["train_loss"] for d in epochs] == pytest.approx(model.epoch_train_losses)
    assert [d["val_loss"] for d in epochs] == pytest.approx([recorder.val_losses[i] for i in range(3)])
    done = events[5]["data"]
    assert done["status"] == "DONE" and done["train_epochs"] == 3
    assert done["metrics"] == {"val_loss": pytest.approx(float(trainer.callback_metrics["val_loss"]))}
    assert events[6]["data"]["n_done"] == 1 and events[6]["data"]["n_failed"] == 0


def test_lightning_epochs_without_validation_carry_no_val_loss(fake):
    torch, L = need("torch"), need("lightning.pytorch")
    from argus.integrations.lightning import ArgusCallback

    model, loader = lightning_setup(torch, L)
    callback = ArgusCallback(project="demo", job_id="every-2nd", argus_url=fake.url)
    lightning_trainer(L, [callback], check_val_every_n_epoch=2).fit(model, loader, loader)
    wait_for_end(fake)

    epochs = [e["data"] for e in fake.of_type("job_epoch")]
    assert [("val_loss" in d) for d in sorted(epochs, key=lambda d: d["epoch"])] == [False, True, False]


def test_lightning_exception_in_training_fails_the_job_and_the_batch(fake):
    torch, L = need("torch"), need("lightning.pytorch")
    from argus.integrations.lightning import ArgusCallback

    model, loader = lightning_setup(torch, L, fail_at_epoch=1)
    callback = ArgusCallback(project="demo", job_id="fails", argus_url=fake.url)
    with pytest.raises(ValueError, match="boom at epoch 1"):
        lightning_trainer(L, [callback]).fit(model, loader, loader)
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "fails"),
        ("job_epoch", "fails"),
        ("log_line", "fails"),  # the traceback
        ("job_failed", "fails"),
        ("batch_failed", None),
    ]
    assert events[2]["data"]["epoch"] == 0
    assert events[3]["data"]["level"] == "error"
    assert events[3]["data"]["line"].endswith("ValueError: boom at epoch 1")
    assert events[4]["data"]["status"] == "FAILED"
    assert events[4]["data"]["reason"] == "ValueError: boom at epoch 1"
    assert events[5]["data"]["reason"] == "ValueError: boom at epoch 1"


def test_lightning_failure_before_training_starts_is_still_reported(fake):
    torch, L = need("torch"), need("lightning.pytorch")
    from argus.integrations.lightning import ArgusCallback

    model, loader = lightning_setup(torch, L, fail_in_validation=True)  # fails in the sanity check
    callback = ArgusCallback(project="demo", job_id="early", argus_url=fake.url)
    with pytest.raises(RuntimeError, match="bad validation data"):
        lightning_trainer(L, [callback]).fit(model, loader, loader)
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "early"),
        ("log_line", "early"),  # the traceback
        ("job_failed", "early"),
        ("batch_failed", None),
    ]
    assert events[2]["data"]["line"].endswith("RuntimeError: bad validation data")
    assert events[3]["data"]["reason"] == "RuntimeError: bad validation data"


def test_lightning_stop_button_stops_the_trainer(fake):
    torch, L = need("torch"), need("lightning.pytorch")
    from argus.integrations.lightning import ArgusCallback

    fake.stop = True  # the Stop button was pressed: the first poll sees it
    model, loader = lightning_setup(torch, L)
    callback = ArgusCallback(project="demo", job_id="stoppable", argus_url=fake.url, stop_polling=0.2)
    # Without the stop this would train 10,000 epochs (max_time bounds a broken test).
    trainer = lightning_trainer(L, [callback], max_epochs=10_000, max_time={"seconds": 60})
    trainer.fit(model, loader)
    wait_for_end(fake)

    assert trainer.should_stop and trainer.current_epoch < 10_000
    types = [t for t, _ in sequence(events_of(fake))]
    assert types[:2] == ["batch_start", "job_start"] and types[-2:] == ["job_done", "batch_done"]
    lines = [e["data"]["line"] for e in fake.of_type("log_line")]
    assert lines == ["Stop requested in Argus: trainer.should_stop = True"]
    assert len(fake.of_type("job_epoch")) == trainer.current_epoch


def test_lightning_callback_also_works_with_the_pytorch_lightning_package(fake):
    torch, pl = need("torch"), need("pytorch_lightning")
    from argus.integrations.lightning import ArgusCallback

    assert issubclass(ArgusCallback, pl.Callback)
    model, loader = lightning_setup(torch, pl)
    callback = ArgusCallback(project="demo", job_id="pl", argus_url=fake.url)
    lightning_trainer(pl, [callback], max_epochs=2).fit(model, loader)
    wait_for_end(fake)

    assert [t for t, _ in sequence(events_of(fake))] == [
        "batch_start",
        "job_start",
        "job_epoch",
        "job_epoch",
        "job_done",
        "batch_done",
    ]


def test_lightning_under_ddp_only_global_rank_zero_reports_and_stop_reaches_every_rank(fake, tmp_path):
    need("torch"), need("lightning.pytorch")
    fake.stop = True
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            import lightning.pytorch as L
            from argus.integrations.lightning import ArgusCallback

            class Linear(L.LightningModule):
                def __init__(self):
                    super().__init__()
                    self.layer = torch.nn.Linear(4, 1)

                def training_step(self, batch, batch_idx):
                    x, y = batch
                    loss = torch.nn.functional.mse_loss(self.layer(x), y)
                    self.log("train_loss", loss, on_epoch=True, sync_dist=True)
                    return loss

                def configure_optimizers(self):
                    return torch.optim.SGD(self.parameters(), lr=0.1)

            x = torch.randn(64, 4)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
            callback = ArgusCallback(project="demo", job_id="ddp", stop_polling=0.2)
            trainer = L.Trainer(
                callbacks=[callback], accelerator="cpu", devices=2, strategy="ddp", max_epochs=10_000,
                max_time={"seconds": 60}, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
            )
            trainer.fit(Linear(), loader)
            print("rank", trainer.global_rank, "stopped at epoch", trainer.current_epoch, flush=True)
            """
        )
    )
    out = run_python([str(script)], tmp_path, fake, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    wait_for_end(fake)

    ranks = sorted(line for line in out.stdout.splitlines() if line.startswith("rank "))
    assert [line.split()[1] for line in ranks] == ["0", "1"]
    assert len({line.split()[-1] for line in ranks}) == 1  # both ranks stopped after the same epoch
    types = [t for t, _ in sequence(events_of(fake))]
    assert types.count("batch_start") == 1 and types.count("job_start") == 1
    assert types[-2:] == ["job_done", "batch_done"]


# --- Keras ----------------------------------------------------------------------------------


def keras_setup(keras, np):
    np.random.seed(0)
    keras.utils.set_random_seed(0)
    x = np.random.randn(64, 4).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)], name="linear")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse", metrics=["mae"])
    return model, x, y


def test_keras_fit_sends_one_epoch_event_per_epoch_with_every_numeric_log(fake):
    keras, np = need("keras"), need("numpy")
    from argus.integrations.keras import ArgusCallback

    model, x, y = keras_setup(keras, np)
    callback = ArgusCallback(project="demo", job_id="dense-3ep", argus_url=fake.url, final_metric_keys=("val_mae",))
    history = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0, callbacks=[callback])
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "dense-3ep"),
        ("job_epoch", "dense-3ep"),
        ("job_epoch", "dense-3ep"),
        ("job_epoch", "dense-3ep"),
        ("job_done", "dense-3ep"),
        ("batch_done", None),
    ]
    assert events[0]["batch_id"].startswith("keras-")
    assert events[0]["data"]["experiment_type"] == "keras"
    assert events[1]["data"] == {"model": "linear"}
    h = history.history
    for epoch, event in enumerate(events[2:5]):
        data = event["data"]
        assert set(data) == {"epoch", "train_loss", "val_loss", "lr", "mae", "val_mae"}
        assert data["epoch"] == epoch
        assert data["lr"] == pytest.approx(0.05)
        assert data["train_loss"] == pytest.approx(h["loss"][epoch])
        assert data["val_loss"] == pytest.approx(h["val_loss"][epoch])
        assert data["mae"] == pytest.approx(h["mae"][epoch])
        assert data["val_mae"] == pytest.approx(h["val_mae"][epoch])
    assert events[5]["data"]["metrics"] == {"val_mae": pytest.approx(h["val_mae"][-1])}
    assert events[5]["data"]["train_epochs"] == 3


def test_keras_report_failure_fails_the_job_and_the_batch(fake):
    keras, np = need("keras"), need("numpy")
    from argus.integrations.keras import ArgusCallback

    class FailAtSecondEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("loss exploded")

    model, x, y = keras_setup(keras, np)
    callback = ArgusCallback(project="demo", job_id="fails", argus_url=fake.url)
    with pytest.raises(RuntimeError, match="loss exploded"):
        try:
            model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback, FailAtSecondEpoch()])
        except Exception as exc:
            callback.report_failure(exc)
            raise
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "fails"),
        ("job_epoch", "fails"),
        ("job_epoch", "fails"),
        ("log_line", "fails"),  # the traceback
        ("job_failed", "fails"),
        ("batch_failed", None),
    ]
    assert events[4]["data"]["level"] == "error"
    assert "in on_epoch_end" in events[4]["data"]["line"]
    assert events[4]["data"]["line"].endswith("RuntimeError: loss exploded")
    assert events[5]["data"]["reason"] == "RuntimeError: loss exploded"
    assert events[6]["data"]["reason"] == "RuntimeError: loss exploded"


def test_keras_failure_nobody_reported_is_closed_when_the_process_ends(fake, tmp_path):
    need("keras"), need("numpy")
    script = tmp_path / "keras_crash.py"
    script.write_text(
        textwrap.dedent(
            """
            import keras, numpy as np
            from argus.integrations.keras import ArgusCallback

            class Crash(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    if epoch == 1:
                        raise MemoryError("out of memory in epoch 1")

            x = np.zeros((32, 4), "float32"); y = np.zeros((32, 1), "float32")
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            model.fit(x, y, epochs=5, verbose=0, callbacks=[ArgusCallback(project="demo", job_id="crash"), Crash()])
            """
        )
    )
    out = run_python([str(script)], tmp_path, fake)
    assert out.returncode == 1 and "MemoryError" in out.stderr
    wait_for_end(fake)

    events = events_of(fake)
    assert [t for t, _ in sequence(events)] == [
        "batch_start",
        "job_start",
        "job_epoch",
        "job_epoch",
        "log_line",  # the traceback of the uncaught exception
        "job_failed",
        "batch_failed",
    ]
    assert events[4]["data"]["line"].endswith("MemoryError: out of memory in epoch 1")
    assert events[5]["data"]["reason"] == "MemoryError: out of memory in epoch 1"


def test_keras_stop_button_stops_fit(fake):
    keras, np = need("keras"), need("numpy")
    from argus.integrations.keras import ArgusCallback

    class Guard(keras.callbacks.Callback):  # ends a broken test instead of 10,000 epochs
        fired = False

        def on_epoch_end(self, epoch, logs=None):
            if epoch >= 2000:
                Guard.fired = self.model.stop_training = True

    fake.stop = True
    model, x, y = keras_setup(keras, np)
    callback = ArgusCallback(project="demo", job_id="stoppable", argus_url=fake.url, stop_polling=0.2)
    history = model.fit(x, y, epochs=10_000, batch_size=32, verbose=0, callbacks=[callback, Guard()])
    wait_for_end(fake)

    assert not Guard.fired and len(history.epoch) < 2000
    types = [t for t, _ in sequence(events_of(fake))]
    assert types[-2:] == ["job_done", "batch_done"]
    assert [e["data"]["line"] for e in fake.of_type("log_line")] == [
        "Stop requested in Argus: model.stop_training = True"
    ]
    assert len(fake.of_type("job_epoch")) == len(history.epoch)


# --- Hydra ----------------------------------------------------------------------------------

HYDRA_APP = '''
import argus
import hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    if cfg.fail_when == cfg.a:
        raise ValueError("a=%s is not allowed" % cfg.a)
    # inside the task the batch and the job are known: emit() lands in them
    job_id = argus.sub_env("${argus_job_id}")
    argus.emit("log_line", job_id=job_id, line="task a=%s in %s" % (cfg.a, argus.get_batch_id()))
    return {"score": cfg.a * 10}


if __name__ == "__main__":
    main()
'''

HYDRA_CONFIG = """
a: 1
name: lin
fail_when: -1
hydra:
  callbacks:
    argus:
      _target_: argus.integrations.hydra.ArgusCallback
      project: demo
"""


def hydra_app(tmp_path, extra_config: str = ""):
    need("hydra")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(HYDRA_CONFIG + extra_config)
    (tmp_path / "main.py").write_text(HYDRA_APP)


def test_hydra_multirun_is_one_batch_with_one_job_per_sweep_point(fake, tmp_path):
    hydra_app(tmp_path)
    out = run_python(["main.py", "-m", "a=1,2"], tmp_path, fake)
    assert out.returncode == 0, out.stderr[-3000:]
    wait_for_end(fake)

    events = events_of(fake)
    batch_id = events[0]["batch_id"]
    assert batch_id.startswith("hydra-")
    assert {e["batch_id"] for e in events} == {batch_id}
    assert [(t, j, e["data"].get("line")) for (t, j), e in zip(sequence(events), events)] == [
        ("batch_start", None, None),
        ("job_start", "0", None),
        ("log_line", "0", "hydra overrides: a=1"),
        ("log_line", "0", "task a=1 in %s" % batch_id),
        ("job_done", "0", None),
        ("job_start", "1", None),
        ("log_line", "1", "hydra overrides: a=2"),
        ("log_line", "1", "task a=2 in %s" % batch_id),
        ("job_done", "1", None),
        ("batch_done", None, None),
    ]
    assert events[0]["data"]["experiment_type"] == "hydra"
    assert events[0]["data"]["n_total_jobs"] == 2
    assert events[4]["data"]["metrics"] == {"score": 10}
    assert events[8]["data"]["metrics"] == {"score": 20}
    assert events[-1]["data"]["n_done"] == 2 and events[-1]["data"]["n_failed"] == 0


def test_hydra_single_run_is_one_batch_with_one_job_named_by_the_template(fake, tmp_path):
    hydra_app(tmp_path, "      job_id_template: '{name}-a{a}-{job_num}'\n")
    out = run_python(["main.py", "a=3"], tmp_path, fake)
    assert out.returncode == 0, out.stderr[-3000:]
    wait_for_end(fake)

    events = events_of(fake)
    assert sequence(events) == [
        ("batch_start", None),
        ("job_start", "lin-a3-0"),
        ("log_line", "lin-a3-0"),
        ("log_line", "lin-a3-0"),
        ("job_done", "lin-a3-0"),
        ("batch_done", None),
    ]
    assert events[0]["data"]["n_total_jobs"] == 1


def test_hydra_failed_job_fails_the_job_and_the_multirun_batch(fake, tmp_path):
    hydra_app(tmp_path)
    out = run_python(["main.py", "-m", "a=1,2", "fail_when=2"], tmp_path, fake)
    assert out.returncode == 1 and "a=2 is not allowed" in out.stderr
    wait_for_end(fake)

    events = events_of(fake)
    assert [(t, j) for t, j in sequence(events) if t != "log_line"] == [
        ("batch_start", None),
        ("job_start", "0"),
        ("job_done", "0"),
        ("job_start", "1"),
        ("job_failed", "1"),
        ("batch_failed", None),
    ]
    failed = fake.of_type("job_failed")[0]["data"]
    assert failed["status"] == "FAILED" and failed["reason"] == "ValueError: a=2 is not allowed"
    (traceback,) = [e["data"] for e in fake.of_type("log_line") if e["data"].get("level") == "error"]
    assert traceback["line"].endswith("ValueError: a=2 is not allowed")
    assert fake.of_type("batch_failed")[0]["data"]["reason"] == "ValueError: a=2 is not allowed"


def test_hydra_failed_single_run_fails_the_job_and_the_batch(fake, tmp_path):
    hydra_app(tmp_path)
    out = run_python(["main.py", "fail_when=1"], tmp_path, fake)
    assert out.returncode == 1
    wait_for_end(fake)

    assert sequence(events_of(fake)) == [
        ("batch_start", None),
        ("job_start", "0"),
        ("log_line", "0"),  # hydra overrides: fail_when=1
        ("log_line", "0"),  # the traceback
        ("job_failed", "0"),
        ("batch_failed", None),
    ]
    assert fake.of_type("job_failed")[0]["data"]["reason"] == "ValueError: a=1 is not allowed"


def test_hydra_jobs_launched_in_other_processes_report_into_the_same_batch(fake, tmp_path):
    need("hydra_plugins.hydra_joblib_launcher")
    hydra_app(tmp_path, "defaults:\n  - override hydra/launcher: joblib\n  - _self_\n")
    out = run_python(["main.py", "-m", "a=1,2,3", "fail_when=3", "hydra.launcher.n_jobs=2"], tmp_path, fake)
    assert out.returncode == 1 and "a=3 is not allowed" in out.stderr
    wait_for_end(fake)

    events = events_of(fake)
    batch_id = events[0]["batch_id"]
    assert {e["batch_id"] for e in events} == {batch_id}
    assert events[0]["data"]["n_total_jobs"] == 3
    ends = {e["job_id"]: e for e in events if e["event_type"] in ("job_done", "job_failed")}
    assert {j: e["event_type"] for j, e in ends.items()} == {"0": "job_done", "1": "job_done", "2": "job_failed"}
    assert ends["2"]["data"]["reason"] == "ValueError: a=3 is not allowed"
    (traceback,) = [e for e in fake.of_type("log_line") if e["data"].get("level") == "error"]
    assert traceback["job_id"] == "2" and traceback["data"]["line"].endswith("ValueError: a=3 is not allowed")
    assert ends["1"]["data"]["metrics"] == {"score": 20}
    lines = sorted(e["data"]["line"] for e in fake.of_type("log_line") if e["data"]["line"].startswith("task"))
    assert lines == ["task a=1 in %s" % batch_id, "task a=2 in %s" % batch_id]
    assert [e["event_type"] for e in events][-1] == "batch_failed"


# --- examples/ ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args, needs, jobs",
    [
        ("lightning_example.py", None, "lightning", {"linear-regression": 3}),
        ("keras_example.py", None, "keras", {"linear-regression": 3}),
        ("hydra_example/main.py", ["-m", "lr=0.05,0.5"], "hydra", {"lr0.05-0": 5, "lr0.5-1": 5}),
    ],
)
def test_examples_run_and_report_every_epoch(fake, tmp_path, monkeypatch, script, args, needs, jobs):
    need(needs)
    path = ROOT / "examples" / script
    if args is None:  # in this process, where torch is already imported
        monkeypatch.setenv("ARGUS_URL", fake.url)
        runpy.run_path(str(path), run_name="__main__")
    else:
        out = run_python([str(path), *args], tmp_path, fake)
        assert out.returncode == 0, out.stderr[-3000:]
    wait_for_end(fake)

    events = events_of(fake)
    assert [e["event_type"] for e in events if e["job_id"] is None] == ["batch_start", "batch_done"]
    assert events[0]["source"]["project"] == "examples"
    assert events[0]["data"]["n_total_jobs"] == len(jobs)
    epochs = {}
    for event in fake.of_type("job_epoch"):
        epochs[event["job_id"]] = epochs.get(event["job_id"], 0) + 1
    assert epochs == jobs
    assert sorted(e["job_id"] for e in fake.of_type("job_done")) == sorted(jobs)
