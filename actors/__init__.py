"""Ray actors, one role each: rollout (vLLM), reward, reference, policy and critic learners.

Each actor is a plain class wrapped with `ray.remote` at launch, so it is testable
without Ray. (Filled in by the PPO-engine issue.)
"""
