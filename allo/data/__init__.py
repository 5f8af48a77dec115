"""Records -> templates -> tokens -> batches. No DeepSpeed, no torch.distributed here."""
