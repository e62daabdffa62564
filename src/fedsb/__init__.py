"""fedsb: federated fine-tuning of language models with Fed-SB (federated LoRA-SB)."""

__version__ = "0.1.0"
