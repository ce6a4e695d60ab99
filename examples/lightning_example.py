"""Report a Lightning training run to Argus: one batch holding one job, one event per epoch.

From the root of a clone:

    pip install '.[lightning]'
    export ARGUS_URL=http://127.0.0.1:8765     # `python3 argus.py serve`, or your server and ARGUS_TOKEN
    python3 examples/lightning_example.py

Without ARGUS_URL the run still trains; argus logs one warning and records nothing.
"""

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from argus.integrations.lightning import ArgusCallback


class LinearRegression(L.LightningModule):
    def __init__(self, n_features: int = 8, lr: float = 0.1):
        super().__init__()
        self.layer = torch.nn.Linear(n_features, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)

    argus_callback = ArgusCallback(
        project="examples",
        job_id="linear-regression",
        dataset="synthetic",
        final_metric_keys=("val_loss",),  # sent with job_done
        stop_polling=True,  # the Stop button in Argus stops the Trainer
    )
    trainer = L.Trainer(
        max_epochs=3, callbacks=[argus_callback], logger=False, enable_checkpointing=False
    )
    trainer.fit(LinearRegression(), train, val)


if __name__ == "__main__":
    main()
