"""zenfed: privacy-first federated LoRA fine-tuning of LLMs on NVIDIA FLARE."""
__version__ = "0.1.0"
