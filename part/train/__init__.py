"""Training: the Trainer that owns a run, and what it is made of.

  trainer.py      the run: stages, resume, step loop, checkpoint and evaluation cadence, end of run
  stage.py        one stage's model, DeepSpeed engine and data stream, and the training step
  distributed.py  process setup and the few collectives the trainer needs
  records.py      the typed record one training step returns
  callbacks.py    hooks a step calls (tests install them to inject faults)
  curriculum.py   the curriculum controller (step in, stage and lr out)
  checkpoint.py   atomic checkpoints and the final export
  logging.py      console, train_log.jsonl and wandb on rank 0
  preflight.py    the checks `train.py --check` runs before any process starts
  launcher.py     commands for the `deepspeed` launcher (comparison, benchmark, tests)
"""
