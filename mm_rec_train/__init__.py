"""The main job around the MM-Rec model: data, tokenizer, a safe run folder, training with
transformers' Trainer, evaluation (bits per byte), prompts and saved streams, the loss plot.

``scripts/train.py``, ``scripts/evaluate.py`` and ``scripts/generate.py`` are argument parsing
around these modules:

    corpus = load_corpus("my_texts/")                 # or None: the bundled Shakespeare corpus
    train_texts, held_out = split_corpus(corpus, validation_fraction=0.05)
    run = RunConfig.from_preset("laptop", ...)        # everything that fixes the data and the model
    summary = train(run, "runs/mine")                 # checkpoints, final folder, results.json, loss curve
    metrics = evaluate_texts(model, tokenizer, held_out.values(), block_size=128)

The model never imports this package: ``mm_rec/`` is what a checkpoint carries, this is not.
Install it with the ``train`` extra (``pip install -e ".[train]"``).
"""
