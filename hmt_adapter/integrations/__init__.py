"""What users opt into: TRL training helpers (trl.py), the lm-evaluation-harness model ``hmt`` (lm_eval.py, needs
``hmt-adapter[eval]``) and FSDP2 sharding (fsdp.py). Each is imported on its own (``from
hmt_adapter.integrations.trl import ...``), so this package imports none of them."""
