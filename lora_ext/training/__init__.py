"""lora_ext.training: fine-tuning on top of the core and the export layers.

    data.py        bundled data sets, CSV/JSONL/text loading, splits, batches
    models.py      bundled models (MiniLM-L6, SmolLM2-135M) and loading a model by kind
    trainer.py     TrainConfig and train(): set-up, resume, steps, finish (also under torchrun)
    hf.py          LoraTrainer: transformers.Trainer saving the adapter in PEFT's format

Import the submodules directly (``from lora_ext.training.trainer import TrainConfig, train``).
"""
