"""GPU memory: what the GPUs hold, what each engine needs, and which engines make room.

`policy` is pure (the scheduler calls `plan_placement`); `footprints` persists what was
measured; `inventory` reads the GPUs (NVML) or takes them from the config.
"""
