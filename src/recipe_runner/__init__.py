"""recipe-runner: DPO/ORPO preference fine-tuning of Llama 3 from NxDT-style recipes."""

__version__ = "0.1.0"
