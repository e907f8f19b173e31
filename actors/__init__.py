"""Worker-side code, one role per module: rollout (vLLM, HF), reward, reference, the PPO
policy and critic learners, and the SFT and reward-model Ray Train workers
(sft_worker.py, rm_worker.py), all set up through one DeepSpeed module (deepspeed_rank.py).

Each actor is a plain class wrapped with `ray.remote` at launch, so it is testable
without Ray. Actors import only the layers below them (orchestrator errors, config,
experience, rl, tasks, data, run, models and rlhf.kernels; tests/unit/test_imports.py).
"""
from rlhf.orchestrator.run.quiet import quiet_if_worker

quiet_if_worker()  # in a Ray worker: our loggers' format, before any actor of ours runs
