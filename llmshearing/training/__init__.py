"""Training: the run config (schema + checks), the Trainer builder (FSDP2/DDP), resume, launch, reference losses."""
