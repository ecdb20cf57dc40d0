"""megatron_lcr: long-context reasoning post-training on Megatron-Core (DePO, DePO-IW, dGRPO)."""

__version__ = "0.1.0"
