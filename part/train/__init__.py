"""Training: the Trainer that owns a run, and what it is made of (the curriculum itself, a pure schedule that the
comparison reads too, is part/curriculum.py).

  trainer.py      the run: stages, resume, step loop, checkpoint and evaluation cadence, end of run
  stage.py        one stage's model, DeepSpeed engine and data stream, and the training step
  distributed.py  process setup and the few collectives the trainer needs
  records.py      the typed record one training step returns
  callbacks.py    hooks a step calls (tests install them to inject faults)
  checkpoint.py   atomic checkpoints and the final export
  logging.py      console, train_log.jsonl and wandb on rank 0
  preflight.py    the checks `train.py --check` runs before any process starts
  launcher.py     commands for the `deepspeed` launcher (comparison, benchmark, tests)
  recipe_pair.py  the comparison's training half: the PART recipe and its baseline, checked, then trained in turn
  memory.py, model_card.py, profiling.py, resume_check.py  the estimate `--check` prints, the exported model's
                  card, the profiler window, what a resume may change
"""
