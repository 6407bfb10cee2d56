"""GPU memory: what the GPUs hold, what each engine needs, and which engines make room.

- `policy`: pure; the scheduler calls `plan_placement` before every start or wake.
- `search`: the cheapest-sufficient-set search the policy uses (exact when small).
- `footprints`: measured footprints per model and engine configuration, in SQLite.
- `estimate`: bytes to plan for before anything was measured.
- `inventory`: the GPUs, from NVML or declared in the config.
"""
