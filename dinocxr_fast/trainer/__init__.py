"""The trainer, as components: ``arguments`` (command lines), ``resume`` (what a resumed run
continues with), ``commands`` (each subcommand: config -> job -> run), ``loop`` (the training loop
every job shares) and one module per job: ``pretrain``, ``finetune``, ``linear_probe``, plus
``teacher_backbone`` (the artefact pretraining hands on). ``python -m dinocxr_fast.train`` is the
entry point."""
