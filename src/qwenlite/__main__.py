"""``python -m qwenlite``: list the commands."""

COMMANDS = """qwenlite commands (each takes --help):
  python -m qwenlite.train        LoRA fine-tuning with a FLOPS ledger
  python -m qwenlite.evaluate     forecast metrics vs baselines
  python -m qwenlite.flops        FLOPS accounting (--breakdown)
  python -m qwenlite.budget       the FLOPS ledger
  python -m qwenlite.preprocessor LLMTIME examples
  python -m qwenlite.data         simulate / summarise datasets
  python -m qwenlite.generate     generate text from a prompt
  python -m qwenlite.download     fetch a checkpoint from the hub"""

if __name__ == "__main__":
    print(COMMANDS)
