"""Short `transformers.Trainer` runs on CPU for the training tests."""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainingArguments


def fit(model, dataset, collator, output_dir: Path, *, steps: int = 40, lr: float = 3e-3, batch_size: int = 16,
        logging_steps: int = 5, epochs: int | None = None, trainer_cls: type = Trainer):
    """Train `model` with a real Trainer (`steps` optimizer steps, or `epochs` passes); returns
    (trainer, the logged losses)."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps if epochs is None else -1,
        num_train_epochs=epochs or 1,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
