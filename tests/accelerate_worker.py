"""Trains a tiny MM-Rec for a few steps with Trainer and writes rank 0's per-step losses and a
weight checksum to OUT/result.json. Run once as plain python and once under
``accelerate launch --multi_gpu --num_processes 2`` (no GPU visible: gloo on CPU) with half the
per-device batch (test_modeling_mmrec_trainer.py::test_accelerate_two_cpu_processes_match_one)."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from common import corpus_blocks, cpu_trainer, step_losses, tiny_model, tokenizer_fields

from mm_rec_train.data import byte_level_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = byte_level_tokenizer()
    model = tiny_model(seed=0, **tokenizer_fields(tokenizer))
    trainer = cpu_trainer(model, tokenizer, corpus_blocks(tokenizer, block_size=32, rows=64),
                          args.out, max_steps=6, per_device_train_batch_size=args.per_device_batch)
    trainer.train()
    if trainer.is_world_process_zero():
        weight_sum = sum(p.double().abs().sum().item() for p in trainer.model.parameters())
        result = dict(world_size=trainer.args.world_size, losses=step_losses(trainer), weight_sum=weight_sum)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        # Leave together (no rank closes its sockets under a working one), then skip the gloo
        # group's teardown: ~ProcessGroupGloo joins its worker thread, which may still be freeing
        # the last collective's tensors and needs the GIL for that. At interpreter exit the
        # thread is killed there (std::terminate: SIGABRT); from destroy_process_group() or a
        # freed DDP reducer the two threads deadlock (the main one holds the GIL).
        trainer.accelerator.wait_for_everyone()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
