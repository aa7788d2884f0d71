"""The one training program and the run around it.

    optimizer.py    AdamW per trainable collection (optax multi_transform), schedules, clipping
    loss.py         the supervised next-token loss
    step.py         `TrainProgram`: adapters, train state and the jitted step, built once and
                    used by train.py and by every benchmark tool (bench/)
    loop.py         the run: load, shard, loop, checkpoint, resume, log (train.py is its CLI)
    checkpoints.py  the run's orbax checkpoints (train state + data position)
    metrics.py      metrics.jsonl, TensorBoard, loss.png
    sharding.py     the device mesh and the logical-axis rules
"""
