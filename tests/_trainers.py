"""A quiet single-process CPU Trainer for tests."""

import lightning as L


def cpu_trainer(**kwargs) -> L.Trainer:
    """CPU, one device, no logger/progress bar/summary/sanity check/checkpointing unless ``kwargs`` say otherwise."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**(options | kwargs))
